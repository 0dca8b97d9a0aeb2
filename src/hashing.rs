//! Token hashing, byte-for-byte what `knox.crypto.hash_token` computes with its default
//! `SECURE_HASH_ALGORITHM` (SHA-512 over the token's UTF-8 bytes, lower-case hex).

use sha2::{Digest, Sha512};

pub fn sha512_hex(token: &str) -> String {
    lower_hex(&Sha512::digest(token.as_bytes()))
}

/// Lower-case hex, as `hex::encode` (which builds the string a `char` at a time: half a
/// microsecond for a digest, a tenth of a cache hit's time).
pub fn lower_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = Vec::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(DIGITS[usize::from(byte >> 4)]);
        out.push(DIGITS[usize::from(byte & 0xf)]);
    }
    // Only ASCII digits and letters were pushed.
    String::from_utf8(out).unwrap_or_default()
}

/// The part of a digest that names a token inside its Redis hash: 128 bits of SHA-512 are as
/// hard to forge as the whole digest, and the shorter field keeps each cached token small.
pub const FIELD_ID_LEN: usize = 32;

pub fn field_id(digest: &str) -> Option<&str> {
    digest.get(..FIELD_ID_LEN).filter(|id| id.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_knox_for_known_vector() {
        // sha512("abc") from FIPS 180-2.
        assert_eq!(
            sha512_hex("abc"),
            "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a\
             2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f"
        );
    }

    #[test]
    fn lower_hex_is_hex_encode() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(lower_hex(&bytes), hex::encode(&bytes));
        assert_eq!(lower_hex(&[]), "");
    }

    #[test]
    fn hashes_utf8_bytes() {
        assert_eq!(sha512_hex("é").len(), 128);
        assert_ne!(sha512_hex("é"), sha512_hex("e"));
    }

    #[test]
    fn field_id_rejects_short_or_non_hex() {
        assert_eq!(field_id(&"a".repeat(128)), Some(&*"a".repeat(32)));
        assert_eq!(field_id("abc"), None);
        assert_eq!(field_id(&"z".repeat(128)), None);
        assert_eq!(field_id(&"é".repeat(40)), None);
    }
}
