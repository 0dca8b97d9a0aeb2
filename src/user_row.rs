//! A cached user row (for `USER_CACHE`): the values the database holds for the user's
//! columns, as Django's fields prepare them for the database (`get_db_prep_value`), so that a
//! hit rebuilds the user through the fields' own converters, as `from_db` does from a row.
//! An encrypted field's value stays encrypted here; the password is never part of it.
//!
//! Never pickle: each value is a small tagged primitive. The Python side maps what the
//! database layer produces (datetimes, decimals, UUIDs...) to a tag and a primitive, and back.
//!
//! ```text
//! version      1   VERSION
//! hint         1   the first byte of the writer's incarnation (incarnation.rs; the MAC covers all 16)
//! fresh_until  4   u32 seconds since the epoch: re-read from the database after this
//! count        v   varint: number of values
//! per value        tag (1 byte, 0 = none) | kind (1 byte) | payload
//!                  kind: 0 null, 1 false, 2 true, 3 int (zigzag varint), 4 float (8 bytes),
//!                        5 text (varint length + UTF-8), 6 bytes (varint length + bytes)
//! mac         16   HMAC-SHA256(key, DOMAIN, user key, incarnation, version..values)[..16]
//! ```
//!
//! The MAC binds the row to the user's primary key (as the user index key spells it), so a
//! row moved under another user is a miss, like a forged one; and to the incarnation of Redis
//! it was written to, so a row restored from an older snapshot, or replicated before a
//! failover, is a miss too.

use crate::incarnation::Incarnation;
use crate::record::{put_varint, unzigzag, zigzag, Reader, RecordKey, Rejected, MAC_LEN};

pub const VERSION: u8 = 2;
const DOMAIN: &[u8] = b"knox_redis user row v2";

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
    Bytes(Vec<u8>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct UserRow {
    pub fresh_until_s: u32,
    /// `(tag, value)`: the tag tells the Python side how to rebuild the value (0: as is).
    pub values: Vec<(u8, Value)>,
}

impl UserRow {
    pub fn encode(&self, key: &RecordKey, user_key: &str, incarnation: Incarnation) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + 16 * self.values.len());
        out.push(VERSION);
        out.push(incarnation.hint());
        out.extend_from_slice(&self.fresh_until_s.to_le_bytes());
        put_varint(&mut out, self.values.len() as u64);
        for (tag, value) in &self.values {
            out.push(*tag);
            match value {
                Value::Null => out.push(0),
                Value::Bool(false) => out.push(1),
                Value::Bool(true) => out.push(2),
                Value::Int(i) => {
                    out.push(3);
                    put_varint(&mut out, zigzag(*i));
                }
                Value::Float(f) => {
                    out.push(4);
                    out.extend_from_slice(&f.to_le_bytes());
                }
                Value::Text(s) => {
                    out.push(5);
                    put_varint(&mut out, s.len() as u64);
                    out.extend_from_slice(s.as_bytes());
                }
                Value::Bytes(b) => {
                    out.push(6);
                    put_varint(&mut out, b.len() as u64);
                    out.extend_from_slice(b);
                }
            }
        }
        let tag = key.mac_for(DOMAIN, &[user_key.as_bytes(), incarnation.as_bytes()], &out);
        out.extend_from_slice(&tag);
        out
    }

    pub fn decode(
        bytes: &[u8],
        keys: &[RecordKey],
        user_key: &str,
        incarnation: Incarnation,
    ) -> Result<UserRow, Rejected> {
        if bytes.len() < 1 + 1 + 4 + 1 + MAC_LEN {
            return Err(Rejected::Undecodable);
        }
        let (body, tag) = bytes.split_at(bytes.len() - MAC_LEN);
        let (row, hint) = parse(body).ok_or(Rejected::Undecodable)?;
        if hint != incarnation.hint() {
            return Err(Rejected::OtherIncarnation);
        }
        if keys.iter().any(|key| key.verify_for(DOMAIN, &[user_key.as_bytes(), incarnation.as_bytes()], body, tag)) {
            Ok(row)
        } else {
            Err(Rejected::BadMac)
        }
    }
}

/// The row, and the hint of the incarnation it says it was written to.
fn parse(body: &[u8]) -> Option<(UserRow, u8)> {
    let mut r = Reader(body);
    if r.byte()? != VERSION {
        return None;
    }
    let hint = r.byte()?;
    let fresh_until_s = u32::from_le_bytes(r.array()?);
    let count = usize::try_from(r.varint()?).ok()?;
    // Each value takes at least two bytes: a count beyond that is garbage, not an allocation.
    if count > r.0.len() / 2 {
        return None;
    }
    let mut values = Vec::with_capacity(count);
    for _ in 0..count {
        let tag = r.byte()?;
        let value = match r.byte()? {
            0 => Value::Null,
            1 => Value::Bool(false),
            2 => Value::Bool(true),
            3 => Value::Int(unzigzag(r.varint()?)),
            4 => Value::Float(f64::from_le_bytes(r.array()?)),
            5 => {
                let len = usize::try_from(r.varint()?).ok()?;
                Value::Text(String::from_utf8(r.take(len)?.to_vec()).ok()?)
            }
            6 => {
                let len = usize::try_from(r.varint()?).ok()?;
                Value::Bytes(r.take(len)?.to_vec())
            }
            _ => return None,
        };
        values.push((tag, value));
    }
    r.0.is_empty().then_some((UserRow { fresh_until_s, values }, hint))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> RecordKey {
        RecordKey::derive(b"secret", "knox\x000")
    }

    fn inc() -> Incarnation {
        Incarnation::of("run", "replid")
    }

    fn sample() -> UserRow {
        UserRow {
            fresh_until_s: 1_764_000_060,
            values: vec![
                (0, Value::Int(42)),
                (0, Value::Text("alice".into())),
                (0, Value::Bool(true)),
                (0, Value::Null),
                (b'T', Value::Text("2026-11-25 18:10:20.288729".into())),
                (0, Value::Float(1.5)),
                (0, Value::Bytes(vec![0, 255, 7])),
                (0, Value::Int(i64::MIN)),
            ],
        }
    }

    #[test]
    fn round_trips() {
        let row = sample();
        let bytes = row.encode(&key(), "42", inc());
        assert_eq!(UserRow::decode(&bytes, &[key()], "42", inc()), Ok(row));
    }

    #[test]
    fn bound_to_its_user_and_key() {
        let bytes = sample().encode(&key(), "42", inc());
        assert_eq!(UserRow::decode(&bytes, &[key()], "43", inc()), Err(Rejected::BadMac));
        assert_eq!(
            UserRow::decode(&bytes, &[RecordKey::derive(b"other", "knox\x000")], "42", inc()),
            Err(Rejected::BadMac)
        );
        for i in 0..bytes.len() {
            let mut altered = bytes.clone();
            altered[i] ^= 0x01;
            assert!(UserRow::decode(&altered, &[key()], "42", inc()).is_err(), "byte {i}");
        }
    }

    #[test]
    fn a_row_written_to_another_incarnation_is_a_miss() {
        let bytes = sample().encode(&key(), "42", inc());
        let restarted = Incarnation::of("restarted", "replid");
        assert!(UserRow::decode(&bytes, &[key()], "42", restarted).is_err());
        let mut other_hint = inc();
        other_hint.0[0] ^= 1;
        assert_eq!(UserRow::decode(&bytes, &[key()], "42", other_hint), Err(Rejected::OtherIncarnation));
    }

    #[test]
    fn a_token_record_is_not_a_user_row() {
        // Domain separation: the same key never verifies one kind as the other.
        use crate::record::{Record, UserPk};
        let record = Record { user_pk: UserPk::Int(42), created_us: 1, expiry_us: None, fresh_until_us: 1_000_000 };
        let bytes = record.encode(&key(), "42", "0123456789abcdef0123456789abcdef", [0; 8], inc());
        assert!(UserRow::decode(&bytes[8..], &[key()], "42", inc()).is_err());
    }

    #[test]
    fn garbage_is_undecodable() {
        for junk in [&b""[..], &[1, 0, 0, 0, 0, 255, 255, 255, 255, 15][..], &[0xff; 40][..]] {
            assert_eq!(UserRow::decode(junk, &[key()], "42", inc()), Err(Rejected::Undecodable), "{junk:?}");
        }
    }
}
