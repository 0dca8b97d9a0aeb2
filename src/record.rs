//! The cached record of one token, and its JSON encoding.
//!
//! Times are integer microseconds since the Unix epoch, computed by Django from
//! `timezone.now()`, so expiry is judged by the same clock (and freezegun) as knox uses.
//! Anything that does not decode into a valid record is a cache miss, never an error.

use serde::{Deserialize, Serialize};

pub const VERSION: u8 = 1;

/// 9999-12-31T23:59:59.999999Z in microseconds: the last instant a `datetime` can hold.
pub const MAX_US: i64 = 253_402_300_799_999_999;

/// A user primary key: the integer and string (UUID, slug) keys Django models use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum UserPk {
    Int(i64),
    Str(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    #[serde(rename = "v")]
    pub version: u8,
    /// The token's full digest: the hash field names it by a prefix, and the caller checks the
    /// whole with a constant-time comparison, as knox does against the row.
    #[serde(rename = "d")]
    pub digest: String,
    #[serde(rename = "u")]
    pub user_pk: UserPk,
    #[serde(rename = "c")]
    pub created_us: i64,
    #[serde(rename = "e")]
    pub expiry_us: Option<i64>,
    /// After this instant the record must be re-read from the database (bounds staleness of
    /// writes that bypass Django signals).
    #[serde(rename = "f")]
    pub fresh_until_us: i64,
}

impl Record {
    pub fn encode(&self) -> String {
        // Serializing a struct of integers and strings cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// `None` for anything that is not a record this version wrote, including times that
    /// Python's `datetime` can't represent (garbage must be a miss, never an `OverflowError`).
    pub fn decode(bytes: &[u8]) -> Option<Record> {
        let record: Record = serde_json::from_slice(bytes).ok()?;
        let times_ok = [Some(record.created_us), record.expiry_us, Some(record.fresh_until_us)]
            .into_iter()
            .flatten()
            .all(|us| (0..=MAX_US).contains(&us));
        let digest_ok =
            record.digest.len() >= crate::hashing::FIELD_ID_LEN && record.digest.bytes().all(|b| b.is_ascii_hexdigit());
        (record.version == VERSION && times_ok && digest_ok).then_some(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(pk: UserPk) -> Record {
        Record {
            version: VERSION,
            digest: "ab".repeat(64),
            user_pk: pk,
            created_us: 1,
            expiry_us: Some(2),
            fresh_until_us: 3,
        }
    }

    #[test]
    fn round_trips_int_and_string_keys() {
        for pk in [UserPk::Int(42), UserPk::Str("0b7c6f9e-uuid".into())] {
            let rec = sample(pk);
            assert_eq!(Record::decode(rec.encode().as_bytes()), Some(rec));
        }
    }

    #[test]
    fn garbage_is_none() {
        for junk in [&b""[..], b"null", b"{}", b"\xff\xfe", b"{\"v\":1}", b"[1,2,3]", b"{\"v\":1,\"u\":1,\"c\":1"] {
            assert_eq!(Record::decode(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn other_versions_are_none() {
        let mut rec = sample(UserPk::Int(1));
        rec.version = 2;
        assert_eq!(Record::decode(rec.encode().as_bytes()), None);
    }

    #[test]
    fn out_of_range_times_are_none() {
        for (c, e, f) in [(-1, None, 1), (1, Some(MAX_US + 1), 1), (1, None, i64::MAX), (i64::MIN, Some(1), 1)] {
            let rec = Record {
                version: VERSION,
                digest: "ab".repeat(64),
                user_pk: UserPk::Int(1),
                created_us: c,
                expiry_us: e,
                fresh_until_us: f,
            };
            assert_eq!(Record::decode(rec.encode().as_bytes()), None, "{c} {e:?} {f}");
        }
    }

    #[test]
    fn non_hex_digests_are_none() {
        for digest in ["é".repeat(64), String::new(), "zz".repeat(64)] {
            let mut rec = sample(UserPk::Int(1));
            rec.digest = digest;
            assert_eq!(Record::decode(rec.encode().as_bytes()), None);
        }
    }

    #[test]
    fn no_expiry_round_trips() {
        let mut rec = sample(UserPk::Int(1));
        rec.expiry_us = None;
        assert_eq!(Record::decode(rec.encode().as_bytes()), Some(rec));
    }
}
