//! One error type for the crate, mapped to one Python exception family.
//!
//! `CacheError` derives from `Exception` (not `BaseException`), so Django code can fail open with
//! a plain `except CacheError`. `CacheUnavailable` marks failures where Redis could not be reached
//! in time (connect, read, write, circuit open): the only ones that may trip the breaker.

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::PyErr;

create_exception!(
    _knox_redis,
    CacheError,
    PyException,
    "Base class of every error raised by the native knox_redis client."
);
create_exception!(
    _knox_redis,
    CacheUnavailable,
    CacheError,
    "Redis could not be reached in time, or the circuit breaker is open."
);

#[derive(Debug)]
pub enum Error {
    /// Connect, read or write failed or timed out; the connection was dropped.
    Unavailable(String),
    /// The breaker is open: a recent call failed, so this one did not try.
    CircuitOpen,
    /// Redis answered with an error, or with a reply of an unexpected shape.
    Reply(String),
    /// The caller passed a value the cache cannot store.
    Invalid(String),
}

impl Error {
    pub fn from_redis(err: &redis::RedisError) -> Self {
        if is_connectivity(err) {
            Error::Unavailable(err.to_string())
        } else {
            Error::Reply(err.to_string())
        }
    }
}

/// Errors after which the connection can't be trusted and Redis may be unreachable.
pub fn is_connectivity(err: &redis::RedisError) -> bool {
    err.is_io_error() || err.is_timeout() || err.is_connection_dropped() || err.is_connection_refusal()
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Unavailable(msg) => write!(f, "redis unavailable: {msg}"),
            Error::CircuitOpen => write!(f, "redis unavailable: circuit breaker open"),
            Error::Reply(msg) => write!(f, "unexpected redis reply: {msg}"),
            Error::Invalid(msg) => write!(f, "invalid value: {msg}"),
        }
    }
}

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        match err {
            Error::Unavailable(_) | Error::CircuitOpen => CacheUnavailable::new_err(err.to_string()),
            Error::Reply(_) | Error::Invalid(_) => CacheError::new_err(err.to_string()),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
