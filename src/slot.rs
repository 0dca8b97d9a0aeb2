//! Where the in-process caches (local.rs, decoded.rs) keep a lookup's reply.

use std::collections::HashMap;

/// A cached reply's place: the field, whether the row came with it, and the `token_key`, in one
/// string (`{field length}:{field}{0|1}{token_key}`: unambiguous for any field), so that a
/// hit can look it up from a buffer on the stack (`SlotName`) without allocating.
pub type Slot = String;

pub fn slot(token_key: &str, field: &str, with_user: bool) -> Slot {
    format!("{}:{field}{}{token_key}", field.len(), u8::from(with_user))
}

/// `slot(...)` written into a stack buffer, when it fits (always, for a token's own: a
/// 32-character field id and a 15-character `token_key`).
struct SlotName {
    buf: [u8; 128],
    len: usize,
}

impl SlotName {
    fn new(token_key: &str, field: &str, with_user: bool) -> Option<Self> {
        use std::io::Write;
        let mut name = SlotName { buf: [0; 128], len: 0 };
        let mut out = &mut name.buf[..];
        write!(out, "{}:{field}{}{token_key}", field.len(), u8::from(with_user)).ok()?;
        name.len = 128 - out.len();
        Some(name)
    }

    fn as_str(&self) -> &str {
        // Written from &strs and ASCII digits: always UTF-8.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

/// `map[slot(token_key, field, with_user)]`, without allocating the name when it fits.
pub fn find<'m, V>(map: &'m HashMap<Slot, V>, token_key: &str, field: &str, with_user: bool) -> Option<&'m V> {
    match SlotName::new(token_key, field, with_user) {
        Some(name) => map.get(name.as_str()),
        None => map.get(&slot(token_key, field, with_user)),
    }
}
