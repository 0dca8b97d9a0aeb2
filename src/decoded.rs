//! Replies already decoded: a lookup whose reply is, byte for byte, one this process decoded
//! before for the same token, from the same server incarnations, returns the object built
//! then (the Python `Lookup`: immutable) instead of verifying, decoding and building again.
//!
//! Nothing is trusted that Redis didn't just send: every lookup still makes its round trip,
//! and only an identical reply reuses the result. What a reply turns into depends on nothing
//! else (the record's MAC keys and the key names are the client's, fixed for its life; the
//! settings that shape the Python objects, `USE_TZ` and `TIME_ZONE`, replace the client when they
//! change), so the result is the one decoding would give. A record revoked, refreshed or
//! filled again reads as other bytes (a tombstone, a new generation), and a user row saved
//! since too. What it saves on a hit: the two MACs, the decode, and the Python objects
//! (datetimes, the user row's converted values, which `build_user` keeps with the row).
//!
//! Bounded (FIFO; `CAPACITY` tokens); only found records are kept. Every method checks the
//! pid first: a forked child never takes a lock a parent's thread may have held at the fork.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;
use pyo3::{Py, PyAny, Python};

use crate::incarnation::Incarnation;
use crate::slot::{find, slot, Slot};

/// Tokens whose last decoded reply is kept, each with its Python objects (a couple of KB
/// with a user row).
pub const CAPACITY: usize = 1024;

pub type Reply = Arc<Vec<Option<Vec<u8>>>>;

struct Seen {
    stamp: u64,
    reply: Reply,
    incarnations: (Incarnation, Incarnation),
    built: Py<PyAny>,
    /// The key of the user the verified record names.
    user_key: String,
    row_found: Option<bool>,
}

#[derive(Default)]
struct State {
    entries: HashMap<Slot, Seen>,
    /// Insertion order; a position whose stamp is no longer its entry's is stale.
    order: VecDeque<(u64, Slot)>,
    stamps: u64,
}

pub struct Decoded {
    owner_pid: u32,
    state: Mutex<State>,
}

impl Default for Decoded {
    fn default() -> Self {
        Decoded { owner_pid: crate::process::id(), state: Mutex::new(State::default()) }
    }
}

impl Decoded {
    fn ours(&self) -> bool {
        crate::process::id() == self.owner_pid
    }

    /// What was built from this very reply, the user key its record names, and whether it
    /// held a usable user row.
    pub fn get(
        &self,
        py: Python<'_>,
        (token_key, field, with_user): (&str, &str, bool),
        reply: &[Option<Vec<u8>>],
        incarnations: (Incarnation, Incarnation),
    ) -> Option<(Py<PyAny>, String, Option<bool>)> {
        if !self.ours() {
            return None;
        }
        let same = |seen: &Seen| {
            (seen.incarnations == incarnations && seen.reply.as_slice() == reply)
                .then(|| (seen.built.clone_ref(py), seen.user_key.clone(), seen.row_found))
        };
        find(&self.state.lock().entries, token_key, field, with_user).and_then(same)
    }

    /// Keep what `reply` (a found record's) was decoded into.
    pub fn keep(
        &self,
        (token_key, field, with_user): (&str, &str, bool),
        reply: Reply,
        incarnations: (Incarnation, Incarnation),
        built: Py<PyAny>,
        user_key: String,
        row_found: Option<bool>,
    ) {
        if !self.ours() {
            return;
        }
        let name = slot(token_key, field, with_user);
        let mut state = self.state.lock();
        state.stamps += 1;
        let stamp = state.stamps;
        let replaced =
            state.entries.insert(name.clone(), Seen { stamp, reply, incarnations, built, user_key, row_found });
        state.order.push_back((stamp, name));
        if replaced.is_none() {
            while state.entries.len() > CAPACITY {
                let Some((stamp, oldest)) = state.order.pop_front() else { break };
                if state.entries.get(&oldest).is_some_and(|seen| seen.stamp == stamp) {
                    state.entries.remove(&oldest);
                }
            }
        }
        if state.order.len() > 2 * CAPACITY {
            let State { entries, order, .. } = &mut *state;
            order.retain(|(stamp, name)| entries.get(name).is_some_and(|seen| seen.stamp == *stamp));
        }
        // Python objects let go here are released with the GIL held (the caller holds it).
        drop(state);
        drop(replaced);
    }

    pub fn clear(&self) {
        if self.ours() {
            let mut state = self.state.lock();
            state.entries.clear();
            state.order.clear();
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        if self.ours() {
            self.state.lock().entries.len()
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(bytes: &[u8]) -> Reply {
        Arc::new(vec![Some(bytes.to_vec()), None])
    }

    const HERE: (Incarnation, Incarnation) = (Incarnation::DETACHED, Incarnation::DETACHED);

    #[test]
    fn only_the_same_reply_from_the_same_server_is_reused() {
        Python::attach(|py| {
            let decoded = Decoded::default();
            let built = py.None();
            decoded.keep(("tk", "id", true), reply(b"r1"), HERE, built, "u".into(), Some(true));
            assert!(decoded.get(py, ("tk", "id", true), &reply(b"r1"), HERE).is_some());
            assert!(decoded.get(py, ("tk", "id", true), &reply(b"r2"), HERE).is_none());
            assert!(decoded.get(py, ("tk", "id", false), &reply(b"r1"), HERE).is_none());
            assert!(decoded.get(py, ("tk2", "id", true), &reply(b"r1"), HERE).is_none());
            let other = (Incarnation([1; 16]), Incarnation::DETACHED);
            assert!(decoded.get(py, ("tk", "id", true), &reply(b"r1"), other).is_none());
        });
    }

    #[test]
    fn bounded_oldest_first() {
        Python::attach(|py| {
            let decoded = Decoded::default();
            for n in 0..=CAPACITY {
                decoded.keep((&n.to_string(), "id", false), reply(b"r"), HERE, py.None(), "u".into(), None);
                // Kept again: replacing doesn't grow it.
                decoded.keep((&n.to_string(), "id", false), reply(b"r"), HERE, py.None(), "u".into(), None);
            }
            assert_eq!(decoded.len(), CAPACITY);
            assert!(decoded.get(py, ("0", "id", false), &reply(b"r"), HERE).is_none());
            assert!(decoded.get(py, ("1", "id", false), &reply(b"r"), HERE).is_some());
            assert!(decoded.get(py, (&CAPACITY.to_string(), "id", false), &reply(b"r"), HERE).is_some());
            assert!(decoded.state.lock().order.len() <= 2 * CAPACITY + 1);
        });
    }
}
