//! The cached record of one token: a compact binary encoding, authenticated with a MAC.
//!
//! Redis is not trusted: whoever can write to it must not be able to plant or alter a record
//! that logs anyone in. Every record carries an HMAC-SHA256 (truncated to 128 bits) over its
//! body, the name it is stored under (`token_key` and field id) and the incarnation of the
//! Redis that it was written to (incarnation.rs), keyed from a secret that only the Django
//! processes hold. A record that fails the MAC, or doesn't decode, is a miss; so is one
//! written to another incarnation (restored from an older snapshot, replicated before a
//! failover): it can't verify under the incarnation that reads it.
//!
//! Layout of the value of field `r:{id}` (little-endian), 47 bytes for an integer user key:
//!
//! ```text
//! generation  8   the lease a later fill must present (not covered by the MAC: it only
//!                 decides whether a fill may land, never what a hit accepts)
//! version     1   high nibble VERSION, bit 0: has expiry, bits 1-2: user key kind
//! hint        1   the first byte of the writer's incarnation (the MAC covers all 16)
//! created     8   i64 microseconds since the Unix epoch
//! expiry      v   zigzag varint of (expiry - created) in microseconds, if present
//! fresh_until 4   u32 seconds since the epoch: re-read from the database after this
//! user key    v   int: zigzag varint | uuid: 16 bytes | text: varint length + UTF-8
//! mac        16   HMAC-SHA256(key, DOMAIN, token_key, id, incarnation, version..user key)[..16]
//! ```
//!
//! Small enough (≤ 64 bytes) for Redis to keep the token's hash as a listpack. The digest is
//! not stored: the record is found under the first 128 bits of it (the field id) and the MAC
//! binds it to those bits and the `token_key`.
//!
//! Times are computed by Django from `timezone.now()`, so expiry is judged by the same clock
//! (and freezegun) as knox uses.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::incarnation::Incarnation;

type HmacSha256 = Hmac<Sha256>;

pub const VERSION: u8 = 3;
pub const GENERATION_LEN: usize = 8;
pub const MAC_LEN: usize = 16;
/// Domain separation: a MAC made for anything else under the same key never verifies here.
const DOMAIN: &[u8] = b"knox_redis record v3";

/// 9999-12-31T23:59:59.999999Z in microseconds: the last instant a `datetime` can hold.
pub const MAX_US: i64 = 253_402_300_799_999_999;

const HAS_EXPIRY: u8 = 0b001;
const KIND_SHIFT: u8 = 1;
const KIND_INT: u8 = 0;
const KIND_UUID: u8 = 1;
const KIND_TEXT: u8 = 2;

/// A user primary key: the integer and string (UUID, slug) keys Django models use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserPk {
    Int(i64),
    Str(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub user_pk: UserPk,
    pub created_us: i64,
    pub expiry_us: Option<i64>,
    /// After this instant the record must be re-read from the database (bounds staleness of
    /// writes that bypass Django signals). Stored in whole seconds, rounded down.
    pub fresh_until_us: i64,
}

/// The key records are authenticated with, derived from the configured secret.
#[derive(Clone)]
pub struct RecordKey([u8; 32]);

fn hmac_with(key: &[u8]) -> HmacSha256 {
    match HmacSha256::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    }
}

impl RecordKey {
    /// The key for records stored under `namespace` (the key prefix and database): a record
    /// copied to another namespace that shares the secret (a staging site on the same Redis)
    /// fails its MAC there.
    pub fn derive(secret: &[u8], namespace: &str) -> Self {
        let mut mac = hmac_with(secret);
        mac.update(b"knox_redis record key\0");
        mac.update(namespace.as_bytes());
        RecordKey(mac.finalize().into_bytes().into())
    }

    /// A MAC over `body` and the names it is stored under (`parts`), for one kind of value
    /// (`domain`): length-prefixed, so no name can be shifted into another, and a value of
    /// one kind never verifies as another.
    fn keyed(&self, domain: &[u8], parts: &[&[u8]], body: &[u8]) -> HmacSha256 {
        let mut mac = hmac_with(&self.0);
        mac.update(domain);
        for part in parts {
            mac.update(&(part.len() as u64).to_le_bytes());
            mac.update(part);
        }
        mac.update(body);
        mac
    }

    pub(crate) fn mac_for(&self, domain: &[u8], parts: &[&[u8]], body: &[u8]) -> [u8; MAC_LEN] {
        let full = self.keyed(domain, parts, body).finalize().into_bytes();
        let mut out = [0u8; MAC_LEN];
        out.copy_from_slice(&full[..MAC_LEN]);
        out
    }

    pub(crate) fn verify_for(&self, domain: &[u8], parts: &[&[u8]], body: &[u8], tag: &[u8]) -> bool {
        self.keyed(domain, parts, body).verify_truncated_left(tag).is_ok() // constant time
    }
}

/// Why a stored value is not a usable record (each is a miss; the counters tell them apart).
#[derive(Debug, PartialEq, Eq)]
pub enum Rejected {
    /// Not this version's encoding: garbage, truncated, another version's record.
    Undecodable,
    /// Decodes, but the MAC doesn't verify: altered, forged, or written under another key.
    BadMac,
    /// Written to another incarnation of Redis (its hint says so): restored from an older
    /// snapshot, or replicated from a primary before a failover. Not trusted here.
    OtherIncarnation,
}

impl Record {
    /// The value stored in Redis: `generation` followed by the authenticated body, for the
    /// incarnation of Redis it is written to.
    pub fn encode(
        &self,
        key: &RecordKey,
        token_key: &str,
        id: &str,
        generation: [u8; GENERATION_LEN],
        incarnation: Incarnation,
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(&generation);
        let kind = match &self.user_pk {
            UserPk::Int(_) => KIND_INT,
            UserPk::Str(s) if uuid_bytes(s).is_some() => KIND_UUID,
            UserPk::Str(_) => KIND_TEXT,
        };
        let has_expiry = if self.expiry_us.is_some() { HAS_EXPIRY } else { 0 };
        out.push((VERSION << 4) | (kind << KIND_SHIFT) | has_expiry);
        out.push(incarnation.hint());
        out.extend_from_slice(&self.created_us.to_le_bytes());
        if let Some(expiry) = self.expiry_us {
            put_varint(&mut out, zigzag(expiry.wrapping_sub(self.created_us)));
        }
        out.extend_from_slice(&whole_seconds(self.fresh_until_us).to_le_bytes());
        match &self.user_pk {
            UserPk::Int(pk) => put_varint(&mut out, zigzag(*pk)),
            UserPk::Str(s) => {
                if let Some(bytes) = uuid_bytes(s) {
                    out.extend_from_slice(&bytes);
                } else {
                    put_varint(&mut out, s.len() as u64);
                    out.extend_from_slice(s.as_bytes());
                }
            }
        }
        let parts = [token_key.as_bytes(), id.as_bytes(), incarnation.as_bytes()];
        let tag = key.mac_for(DOMAIN, &parts, &out[GENERATION_LEN..]);
        out.extend_from_slice(&tag);
        out
    }

    /// The record stored under (`token_key`, `id`), if one of `keys` wrote it (the signing key
    /// first, then fallbacks during a rotation) to this `incarnation` of Redis. Times that
    /// Python's `datetime` can't represent are rejected too: garbage must be a miss, never an
    /// `OverflowError`.
    pub fn decode(
        bytes: &[u8],
        keys: &[RecordKey],
        token_key: &str,
        id: &str,
        incarnation: Incarnation,
    ) -> Result<Record, Rejected> {
        if bytes.len() < GENERATION_LEN + 1 + 1 + 8 + 4 + 1 + MAC_LEN {
            return Err(Rejected::Undecodable);
        }
        let (signed, tag) = bytes.split_at(bytes.len() - MAC_LEN);
        let body = &signed[GENERATION_LEN..];
        let (record, hint) = parse(body).ok_or(Rejected::Undecodable)?;
        if hint != incarnation.hint() {
            return Err(Rejected::OtherIncarnation);
        }
        let parts = [token_key.as_bytes(), id.as_bytes(), incarnation.as_bytes()];
        if keys.iter().any(|key| key.verify_for(DOMAIN, &parts, body, tag)) {
            Ok(record)
        } else {
            Err(Rejected::BadMac)
        }
    }
}

/// The record, and the hint of the incarnation it says it was written to.
fn parse(body: &[u8]) -> Option<(Record, u8)> {
    let mut r = Reader(body);
    let head = r.byte()?;
    if head >> 4 != VERSION || head & 0b1000 != 0 {
        return None;
    }
    let hint = r.byte()?;
    let created_us = i64::from_le_bytes(r.array()?);
    let expiry_us = if head & HAS_EXPIRY != 0 { Some(created_us.checked_add(unzigzag(r.varint()?))?) } else { None };
    let fresh_until_us = i64::from(u32::from_le_bytes(r.array()?)) * 1_000_000;
    let user_pk = match (head >> KIND_SHIFT) & 0b11 {
        KIND_INT => UserPk::Int(unzigzag(r.varint()?)),
        KIND_UUID => UserPk::Str(uuid_string(&r.array::<16>()?)),
        KIND_TEXT => {
            let len = usize::try_from(r.varint()?).ok()?;
            UserPk::Str(String::from_utf8(r.take(len)?.to_vec()).ok()?)
        }
        _ => return None,
    };
    let times_ok =
        [Some(created_us), expiry_us, Some(fresh_until_us)].into_iter().flatten().all(|us| (0..=MAX_US).contains(&us));
    (r.0.is_empty() && times_ok).then_some((Record { user_pk, created_us, expiry_us, fresh_until_us }, hint))
}

pub(crate) struct Reader<'a>(pub(crate) &'a [u8]);

impl<'a> Reader<'a> {
    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    pub(crate) fn byte(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    pub(crate) fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            value |= u64::from(byte & 0x7f).checked_shl(shift)?;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }
}

/// A re-read deadline in whole seconds since the epoch, as records and user rows store it:
/// rounded down and clamped, since an earlier re-read is always safe.
pub(crate) fn whole_seconds(us: i64) -> u32 {
    (us.max(0) / 1_000_000).min(i64::from(u32::MAX)) as u32
}

pub(crate) fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

pub(crate) fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

pub(crate) fn unzigzag(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

/// The 16 bytes of a UUID in Django's canonical spelling (lower case, dashed), so that the
/// string decodes back exactly as it was given; any other string is stored as text.
fn uuid_bytes(s: &str) -> Option<[u8; 16]> {
    let b = s.as_bytes();
    if b.len() != 36 || [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
        return None;
    }
    let hex: Vec<u8> = b.iter().copied().filter(|&c| c != b'-').collect();
    if hex.len() != 32 || !hex.iter().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c)) {
        return None;
    }
    let mut out = [0u8; 16];
    hex::decode_to_slice(&hex, &mut out).ok()?;
    Some(out)
}

fn uuid_string(bytes: &[u8; 16]) -> String {
    let h = hex::encode(bytes);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

#[cfg(test)]
mod tests {
    use super::*;

    const TK: &str = "abcdefghijklmno";
    const ID: &str = "0123456789abcdef0123456789abcdef";
    const GEN: [u8; GENERATION_LEN] = *b"\x01\x02\x03\x04\x05\x06\x07\x08";

    fn key() -> RecordKey {
        RecordKey::derive(b"secret", "knox\x000")
    }

    fn inc() -> Incarnation {
        Incarnation::of("run", "replid")
    }

    fn sample(pk: UserPk) -> Record {
        Record {
            user_pk: pk,
            created_us: 1_764_000_000_123_456,
            expiry_us: Some(1_764_036_000_654_321),
            fresh_until_us: 1_764_003_600_000_000,
        }
    }

    fn round_trip(rec: &Record) -> Result<Record, Rejected> {
        let bytes = rec.encode(&key(), TK, ID, GEN, inc());
        assert_eq!(&bytes[..GENERATION_LEN], &GEN);
        Record::decode(&bytes, &[key()], TK, ID, inc())
    }

    #[test]
    fn round_trips_every_kind_of_user_key() {
        for pk in [
            UserPk::Int(42),
            UserPk::Int(-7),
            UserPk::Int(i64::MAX),
            UserPk::Str("0b7c6f9e-1c2d-4e5f-8a9b-0c1d2e3f4a5b".into()),
            UserPk::Str("0B7C6F9E-1C2D-4E5F-8A9B-0C1D2E3F4A5B".into()), // not canonical: text
            UserPk::Str("slug-é".into()),
            UserPk::Str(String::new()),
        ] {
            let rec = sample(pk);
            assert_eq!(round_trip(&rec), Ok(rec));
        }
    }

    #[test]
    fn no_expiry_round_trips() {
        let mut rec = sample(UserPk::Int(1));
        rec.expiry_us = None;
        assert_eq!(round_trip(&rec), Ok(rec));
    }

    #[test]
    fn an_integer_user_record_fits_a_listpack_entry() {
        let bytes = sample(UserPk::Int(123_456)).encode(&key(), TK, ID, GEN, inc());
        assert!(bytes.len() <= 51, "{}", bytes.len());
        let bytes =
            sample(UserPk::Str("0b7c6f9e-1c2d-4e5f-8a9b-0c1d2e3f4a5b".into())).encode(&key(), TK, ID, GEN, inc());
        assert!(bytes.len() <= 64, "{}", bytes.len());
    }

    #[test]
    fn fresh_until_is_rounded_down_to_the_second() {
        let mut rec = sample(UserPk::Int(1));
        rec.fresh_until_us = 1_764_003_600_999_999;
        assert_eq!(round_trip(&rec).map(|r| r.fresh_until_us), Ok(1_764_003_600_000_000));
    }

    #[test]
    fn any_altered_byte_is_rejected() {
        let bytes = sample(UserPk::Int(42)).encode(&key(), TK, ID, GEN, inc());
        for i in GENERATION_LEN..bytes.len() {
            let mut altered = bytes.clone();
            altered[i] ^= 0x01;
            assert!(Record::decode(&altered, &[key()], TK, ID, inc()).is_err(), "byte {i}");
        }
        // The generation is not covered: it only decides whether a fill may land.
        let mut regenerated = bytes.clone();
        regenerated[0] ^= 0xff;
        assert!(Record::decode(&regenerated, &[key()], TK, ID, inc()).is_ok());
    }

    #[test]
    fn a_record_moved_to_another_token_or_key_is_rejected() {
        let bytes = sample(UserPk::Int(42)).encode(&key(), TK, ID, GEN, inc());
        assert_eq!(Record::decode(&bytes, &[key()], "abcdefghijklmnp", ID, inc()), Err(Rejected::BadMac));
        assert_eq!(
            Record::decode(&bytes, &[key()], TK, "1123456789abcdef0123456789abcdef", inc()),
            Err(Rejected::BadMac)
        );
        assert_eq!(
            Record::decode(&bytes, &[RecordKey::derive(b"other", "knox\x000")], TK, ID, inc()),
            Err(Rejected::BadMac)
        );
        assert_eq!(
            Record::decode(&bytes, &[RecordKey::derive(b"secret", "staging\x000")], TK, ID, inc()),
            Err(Rejected::BadMac)
        );
        assert_eq!(
            Record::decode(&bytes, &[RecordKey::derive(b"secret", "knox\x001")], TK, ID, inc()),
            Err(Rejected::BadMac)
        );
        // A rotation: the old key, kept as a fallback, still verifies what it signed.
        assert!(Record::decode(&bytes, &[RecordKey::derive(b"new", "knox\x000"), key()], TK, ID, inc()).is_ok());
    }

    #[test]
    fn a_record_written_to_another_incarnation_is_not_trusted() {
        let bytes = sample(UserPk::Int(42)).encode(&key(), TK, ID, GEN, inc());
        // Restarted: another run_id. Promoted: another replication id. Either way, not trusted.
        for other in [Incarnation::of("restarted", "replid"), Incarnation::of("run", "promoted")] {
            let got = Record::decode(&bytes, &[key()], TK, ID, other);
            assert!(matches!(got, Err(Rejected::OtherIncarnation | Rejected::BadMac)), "{got:?}");
        }
        // A hint that matches by chance (1 in 256) still fails the MAC, which covers all 16 bytes.
        let mut same_hint = Incarnation::of("restarted", "replid");
        same_hint.0[0] = inc().hint();
        assert_eq!(Record::decode(&bytes, &[key()], TK, ID, same_hint), Err(Rejected::BadMac));
        let mut other_hint = inc();
        other_hint.0[0] ^= 1;
        assert_eq!(Record::decode(&bytes, &[key()], TK, ID, other_hint), Err(Rejected::OtherIncarnation));
    }

    #[test]
    fn garbage_is_undecodable() {
        for junk in
            [&b""[..], b"null", b"{\"v\":1,\"d\":\"ab\",\"u\":1,\"c\":1,\"e\":null,\"f\":3}", &[0xff; 46], &[0; 8]]
        {
            assert_eq!(Record::decode(junk, &[key()], TK, ID, inc()), Err(Rejected::Undecodable), "{junk:?}");
        }
    }

    #[test]
    fn out_of_range_times_are_undecodable() {
        for (c, e) in [(-1, None), (1, Some(MAX_US + 1)), (MAX_US, Some(i64::MAX)), (i64::MIN, Some(1))] {
            let rec = Record { user_pk: UserPk::Int(1), created_us: c, expiry_us: e, fresh_until_us: 1_000_000 };
            assert_eq!(round_trip(&rec), Err(Rejected::Undecodable), "{c} {e:?}");
        }
    }

    #[test]
    fn varints_round_trip_at_the_edges() {
        for v in [0, 1, -1, 63, -64, 64, i64::MAX, i64::MIN] {
            let mut out = Vec::new();
            put_varint(&mut out, zigzag(v));
            assert_eq!(Reader(&out).varint().map(unzigzag), Some(v));
        }
        assert_eq!(Reader(&[0xff; 11]).varint(), None, "longer than 64 bits");
    }
}
