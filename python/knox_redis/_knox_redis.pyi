"""Type stub of the native module (src/). Checked against the built module by `make lint` (stubtest)."""

from collections.abc import Callable
from typing import Any, TypeVar, final, overload

from typing_extensions import Self

__all__ = [
    "CacheError",
    "CacheUnavailable",
    "TokenCache",
    "__version__",
    "count_expired",
    "hash_token",
    "last_trip_kind",
    "process_metrics",
    "reset_metrics",
]

__version__: str

_T = TypeVar("_T")

class CacheError(Exception):
    """Base class of every error raised by the native knox_redis client."""

class CacheUnavailable(CacheError):
    """Redis could not be reached in time, or the circuit breaker is open."""

def hash_token(token: str) -> str:
    """SHA-512 hex digest of a token: what knox.crypto.hash_token returns by default."""

# src/metrics.rs: this process's counters (one set per process, whatever the client).
def process_metrics() -> dict[str, Any]:
    """Counters by name (int), plus "call_duration_seconds_bucket" ({le: cumulative count},
    le "0.0001" ... "+Inf"), "call_duration_seconds_sum" (float) and "..._count" (int)."""

def count_expired() -> None: ...
def last_trip_kind() -> str | None: ...
def reset_metrics() -> None: ...

# What a user row holds per column (with a one-character tag saying how to rebuild it).
_Primitive = None | bool | int | float | str | bytes

# (user_pk, created_us, expiry_us or None, fresh_until_us)
_CachedRecord = tuple[int | str, int, int | None, int]

# (fresh_until_us, [(tag, primitive), ...])
_UserRow = tuple[int, list[tuple[str, _Primitive]]]

# A #[pyclass] without `subclass`: Python can't subclass it.
@final
class TokenCache:
    # PyO3's #[new] is __new__; there is no __init__ of its own.
    def __new__(
        cls,
        *,
        host: str | None = None,
        port: int = 6379,
        unix_path: str | None = None,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        tls_ca_certs: str | None = None,
        key_prefix: str = "knox",
        connect_timeout: float = 0.2,
        socket_timeout: float = 0.2,
        breaker_cooldown: float = 2.0,
        max_idle: int = 32,
        lease_ms: int = 60000,
        record_secret: bytes,
        record_fallback_secrets: list[bytes] = ...,
        local_cache_size: int = 0,
        # Sentinel: connect to the primary these sentinels name for the service (verified by
        # ROLE on each new connection); host and port are then unused.
        sentinels: list[tuple[str, int]] = ...,
        sentinel_service_name: str | None = None,
        sentinel_username: str | None = None,
        sentinel_password: str | None = None,
        sentinel_tls: bool = False,
        sentinel_tls_ca_certs: str | None = None,
        # Redis Cluster: these seed nodes tell the slot map (each call goes to the primary of
        # its key's slot); host and port are then unused. Credentials and TLS as above.
        cluster_nodes: list[tuple[str, int]] = ...,
        # Microseconds a connection polls its socket for a reply before it sleeps (0: never).
        busy_poll_us: int = 100,
    ) -> Self: ...
    @overload
    def lookup(
        self, token_key: str, digest: str, create: bool = False, with_user: bool = False, build: None = None
    ) -> tuple[_CachedRecord | None, bytes | None, _UserRow | None, bytes | None]: ...
    @overload
    def lookup(
        self,
        token_key: str,
        digest: str,
        create: bool,
        with_user: bool,
        build: Callable[[_CachedRecord | None, bytes | None, _UserRow | None, bytes | None], _T],
    ) -> _T: ...
    @overload
    def lookup(
        self,
        token_key: str,
        digest: str,
        create: bool = False,
        with_user: bool = False,
        *,
        build: Callable[[_CachedRecord | None, bytes | None, _UserRow | None, bytes | None], _T],
    ) -> _T: ...
    def lookup_user(self, user_pk: int | str, create: bool = False) -> tuple[_UserRow | None, bytes | None]: ...
    def fill(
        self,
        token_key: str,
        digest: str,
        generation: bytes,
        user_pk: int | str,
        created_us: int,
        expiry_us: int | None,
        fresh_until_us: int,
        ttl_ms: int,
    ) -> bool: ...
    def fill_user(
        self,
        user_pk: int | str,
        generation: bytes,
        fresh_until_us: int,
        values: list[tuple[str, _Primitive]],
        ttl_ms: int,
    ) -> bool: ...
    def claim(self, token_key: str, digest: str) -> bytes | None: ...
    def revoke(
        self,
        tokens: list[tuple[str, str, int | str]],
        users: list[int | str] = ...,
        tombstone_ms: int = 60000,
        use_breaker: bool = False,
        user_rows: list[int | str] = ...,
        lift_tombstone: str | None = None,
    ) -> tuple[int, str]: ...
    def encode_user_row(
        self, user_pk: int | str, fresh_until_us: int, values: list[tuple[str, _Primitive]]
    ) -> bytes: ...
    def decode_user_row(self, user_pk: int | str, data: bytes) -> _UserRow | None: ...
    # On a Redis Cluster, `node` (one of primaries()) says where the command goes.
    def command(self, args: list[bytes], node: str | None = None) -> Any: ...
    def primaries(self) -> list[str]: ...
    def probe_subscribe(self, channels: list[str]) -> None: ...
    def ping(self) -> None: ...
    def reset(self) -> None: ...
    @property
    def breaker_open(self) -> bool: ...
    @property
    def local_cache_live(self) -> bool: ...
    @property
    def local_cache_error(self) -> str | None: ...
    @property
    def primary_address(self) -> str | None: ...
    @property
    def key_prefix(self) -> str: ...
    def token_key(self, token_key: str) -> str: ...
    def user_key(self, user_pk: int | str) -> str: ...
    def stats(self) -> dict[str, int]: ...
