//! Native core of django-rest-knox-redis. Wiring only: each concern lives in its own module.

mod breaker;
mod busy_poll;
mod client;
mod cluster;
mod conn;
mod decoded;
mod errors;
mod fanout;
mod feed;
mod hashing;
mod incarnation;
mod journal;
mod local;
mod metrics;
mod pool;
mod process;
mod record;
mod resp;
#[cfg(test)]
mod script_tests;
mod sentinel;
mod slot;
mod stream;
mod tracking;
mod user_row;

use pyo3::prelude::*;

/// SHA-512 hex digest of a token: what `knox.crypto.hash_token` returns by default.
#[pyfunction]
fn hash_token(token: &str) -> String {
    hashing::sha512_hex(token)
}

#[pymodule]
mod _knox_redis {
    #[pymodule_export]
    use crate::client::TokenCache;
    #[pymodule_export]
    use crate::errors::{CacheError, CacheUnavailable};
    #[pymodule_export]
    use crate::hash_token;
    #[pymodule_export]
    use crate::metrics::{count_expired, last_trip_kind, process_metrics, reset_metrics};

    #[pymodule_init]
    fn init(m: &pyo3::Bound<'_, pyo3::types::PyModule>) -> pyo3::PyResult<()> {
        use pyo3::types::PyModuleMethods;
        crate::process::init();
        crate::metrics::init();
        m.add("__version__", env!("CARGO_PKG_VERSION"))
    }
}
