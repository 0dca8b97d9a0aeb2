//! This process's id, read without a system call.
//!
//! glibc stopped caching `getpid()` (2.25), so `std::process::id()` is a system call: about
//! 150 ns here, and the in-process cache asks it several times per hit (a forked child must
//! never touch the parent's locks or serve its entries). The id is kept in an atomic instead,
//! set when the module loads and again in every child by a `pthread_atfork` handler, which
//! libc's `fork()` runs in the child before `fork()` returns there: `os.fork()`,
//! `multiprocessing` and gunicorn's workers all see their own id from their first instruction.
//! (A child made by a raw `clone` system call, bypassing libc, would not; nothing that then
//! runs Python does that.)

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;

static PID: AtomicU32 = AtomicU32::new(0);
static REGISTERED: Once = Once::new();

extern "C" fn in_child() {
    // Async-signal-safe: one system call and atomic stores.
    PID.store(std::process::id(), Ordering::Release);
    crate::busy_poll::forked();
}

/// Called when the module loads (and by `id` itself, should anything run before that).
pub fn init() {
    REGISTERED.call_once(|| {
        PID.store(std::process::id(), Ordering::Release);
        // SAFETY: registers a handler that is async-signal-safe (see `in_child`); CPython never
        // unloads an extension module, so the function stays mapped for the process's life.
        unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
    });
}

/// This process's id (`std::process::id()`, without the system call).
pub fn id() -> u32 {
    match PID.load(Ordering::Acquire) {
        0 => {
            init();
            PID.load(Ordering::Acquire)
        }
        pid => pid,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_forked_child_sees_its_own_id() {
        let parent = super::id();
        assert_eq!(parent, std::process::id());
        // SAFETY: the child only compares two ids and exits, without unwinding.
        match unsafe { libc::fork() } {
            0 => {
                let ok = super::id() == std::process::id() && super::id() != parent;
                unsafe { libc::_exit(i32::from(!ok)) };
            }
            child if child > 0 => {
                let mut status = 0;
                // SAFETY: waits for the child just forked.
                assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
                assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "status {status}");
            }
            _ => panic!("fork failed"),
        }
    }
}
