"""The user row that USER_CACHE keeps in Redis, and how a user is rebuilt from it.

What is cached is the row exactly as the database driver returned it for the user's columns
(so an encrypted field's value stays encrypted in Redis), and a hit rebuilds the user the way
a query does: Django's compiler applies the backend's and the fields' converters, then
`Model.from_db`, so custom fields round-trip as they do from a row. The password and
`last_login` are never selected nor cached: they are deferred on the user (read from the
database if code touches them), the password hash never leaves the database, and a login's
`last_login` update changes nothing cached.

Never pickle: each value is mapped here to a tagged primitive (None, bool, int, float, str,
bytes), which the native side encodes and signs for the user (`cache.encode_user_row`).
"""

from __future__ import annotations

import datetime
import decimal
import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple

from django.core.exceptions import EmptyResultSet, ValidationError
from django.db import connections
from django.db.models import Field, Model
from django.db.models.sql.compiler import SQLCompiler
from knox.settings import knox_settings

from knox_redis import instances

# Never cached: the rebuilt user defers them.
UNCACHED = frozenset({"password", "last_login"})


class UncacheableValue(TypeError):
    """A column's value has a type the user row can't hold."""


class OtherSchema(ValueError):
    """A cached row written for other columns (the model changed: a deploy, a migration)."""


def token_models() -> tuple[type[Model], type[Model]]:
    """knox's token model (its TOKEN_MODEL setting) and the user model its `user` field names."""
    return _token_models(knox_settings.TOKEN_MODEL)


@lru_cache(maxsize=8)
def _token_models(_label: str) -> tuple[type[Model], type[Model]]:
    from knox.models import get_token_model  # needs the app registry

    token_model = get_token_model()
    return token_model, token_model._meta.get_field("user").related_model  # type: ignore[return-value]


def cached_fields(model: type[Model]) -> list[Field]:
    return [f for f in model._meta.concrete_fields if f.attname not in UNCACHED and f.name not in UNCACHED]


class RowQuery:
    """`SELECT <columns> FROM <user table> WHERE pk = %s`, compiled by Django's own compiler
    once per model and database alias, then run with the cursor: the same SQL, parameters
    and converters as the ORM's query, without building the query anew for every request.

    Converters are bound to a connection (connections are per thread, or per async context
    under ASGI), so they are kept on the connection object itself and die with it."""

    # A primary key no one has: the compiled query's parameters show where the real one goes.
    # (Within every integer field's range: Django turns an out-of-range lookup into no query.)
    SENTINELS = (1_987_654_321, 12_345, "knox-redis-sentinel-pk", uuid.UUID(int=0x6B6E6F78))

    def __init__(self, model: type[Model], using: str, fields: tuple[Field, ...]) -> None:
        self.model, self.using, self.fields = model, using, fields
        self.attnames = [f.attname for f in fields]
        self.builder = instances.builder(model, tuple(self.attnames))
        self.pk_field = model._meta.pk
        self.sql, self.params, self.pk_index = self._compile()
        # The first value of every cached row: a row cached for other columns (another
        # release's model) is a miss, never built into a user with values in the wrong places.
        connection = connections[using]
        columns = [
            (f.attname, f.model._meta.db_table, f.column, f.get_internal_type(), f.db_type(connection)) for f in fields
        ]
        shape = repr([model._meta.label, columns])
        self.fingerprint = ("", hashlib.sha256(shape.encode()).hexdigest()[:16])

    def _compile(self) -> tuple[str, list[Any], int]:
        connection = connections[self.using]
        for sentinel in self.SENTINELS:
            try:
                pk = self.pk_field.to_python(sentinel)
            except (ValueError, TypeError, ValidationError):
                continue
            query = self._query(pk)
            try:
                sql, params = query.get_compiler(using=self.using).as_sql()
            except EmptyResultSet:
                continue
            prepared = self.pk_field.get_db_prep_value(pk, connection, prepared=False)
            matches = [i for i, param in enumerate(params) if param == prepared]
            if len(matches) == 1:
                return sql, list(params), matches[0]
        raise ValueError(f"can't compile a primary key lookup for {self.model.__name__}")

    def _query(self, pk: Any) -> Any:
        return self.model._base_manager.db_manager(self.using).filter(pk=pk).values_list(*self.attnames).query

    def _converters(self, connection: Any) -> dict[int, Any]:
        per_connection = connection.__dict__.setdefault("_knox_redis_converters", {})
        key = (self.model, tuple(self.attnames))
        if key not in per_connection:
            compiler: SQLCompiler = self._query(self.params[self.pk_index]).get_compiler(using=self.using)
            compiler.setup_query()
            per_connection[key] = compiler.get_converters([column for column, _sql, _alias in compiler.select])
        return per_connection[key]

    def fetch(self, pk: Any) -> tuple[Any, ...] | None:
        """The row as the driver returns it (before converters), or None."""
        connection = connections[self.using]
        params = list(self.params)
        params[self.pk_index] = self.pk_field.get_db_prep_value(pk, connection, prepared=False)
        with connection.cursor() as cursor:
            cursor.execute(self.sql, params)
            return cursor.fetchone()

    def cached_values(self, raw: Sequence[Any]) -> list[tuple[str, Any]]:
        """What the cached row holds for the row `raw`: the fingerprint, then each column as
        a `(tag, primitive)` pair. Raises UncacheableValue naming the field."""
        values = [self.fingerprint]
        for field, value in zip(self.fields, raw, strict=True):
            try:
                values.append(to_primitive(value))
            except UncacheableValue as exc:
                raise UncacheableValue(f"{self.model.__name__}.{field.name}: {exc}") from None
        return values

    def convert_cached(self, values: Sequence[tuple[str, Any]]) -> list[Any]:
        """The row as a query on this database hands it to `from_db` (converters applied),
        from the cached values of the row. Raises OtherSchema for a row cached for other
        columns."""
        if not values or tuple(values[0]) != self.fingerprint:
            raise OtherSchema("a user row cached for another version of the model")
        # from_primitive, inlined; a tag this release doesn't know is another release's row.
        return self.convert([value if not tag else _DECODERS.get(tag, _unknown)(value) for tag, value in values[1:]])

    def convert(self, raw: Sequence[Any]) -> list[Any]:
        """The row `raw` (as the driver returned it) with the converters applied."""
        if len(raw) != len(self.fields):
            raise ValueError("a user row with another number of columns (the model changed)")
        connection = connections[self.using]
        row = list(raw)
        for index, (functions, column) in self._converters(connection).items():
            for convert in functions:
                row[index] = convert(row[index], column, connection)
        return row

    def build(self, raw: Sequence[Any]) -> Model:
        """The instance, as a query on this database builds it from the row `raw`."""
        return self.builder(self.using, self.convert(raw))


@lru_cache(maxsize=64)
def row_query(model: type[Model], using: str, *, cached_only: bool = True) -> RowQuery:
    """The compiled query for `model` on `using`: USER_CACHE's columns, or every column."""
    return RowQuery(model, using, tuple(cached_fields(model) if cached_only else model._meta.concrete_fields))


def load_user(model: type[Model], pk: Any, using: str) -> Model | None:
    """The user by primary key, every column, as `_base_manager.get(pk=pk)` would return it,
    in one query compiled once (the query a cache hit still makes without USER_CACHE)."""
    query = row_query(model, using, cached_only=False)
    raw = query.fetch(pk)
    return None if raw is None else query.build(raw)


class FetchedUser(NamedTuple):
    user: Model
    # What USER_CACHE caches of the row (`RowQuery.cached_values`), or None if it can't be
    # cached: then `problem` says why.
    values: list[tuple[str, Any]] | None
    problem: str | None = None


def fetch_user(model: type[Model], pk: Any, using: str) -> FetchedUser | None:
    """The user by primary key (one query), with the password and last_login deferred, and
    what USER_CACHE caches of its row; None if there is no such user."""
    query = row_query(model, using)
    raw = query.fetch(pk)
    if raw is None:
        return None
    try:
        values, problem = query.cached_values(raw), None
    except UncacheableValue as exc:
        values, problem = None, str(exc)
    return FetchedUser(query.build(raw), values, problem)


def build_user(model: type[Model], values: Sequence[tuple[str, Any]], using: str, prepared: dict[Any, Any]) -> Model:
    """The user, as a query on `using` builds it from the row these cached values came from.
    Raises OtherSchema for a row cached for other columns.

    `prepared` goes with the cached row (LOCAL_CACHE_SIZE serves one row to many requests):
    it keeps the converted row, so a repeat hit skips decoding and converters. Only when every
    value is immutable: each request gets its own instance, and no request's change to a
    mutable value (a JSONField's dict) may reach another's."""
    query = row_query(model, using)
    row = prepared.get(query)
    if row is None:
        row = query.convert_cached(values)
        if all(type(value) in IMMUTABLE_TYPES for value in row):
            prepared[query] = tuple(row)
    return query.builder(using, row)


# Values a converted row may share between requests.
IMMUTABLE_TYPES = frozenset(
    {
        type(None),
        bool,
        int,
        float,
        str,
        bytes,
        decimal.Decimal,
        uuid.UUID,
        datetime.datetime,
        datetime.date,
        datetime.time,
        datetime.timedelta,
    }
)


# --- tagged primitives ------------------------------------------------------------------
# What database adapters return for the types Django's fields prepare, spelled so that each
# comes back exactly: datetimes keep their zone (or lack of one) and microseconds.


def to_primitive(value: Any) -> tuple[str, Any]:
    if value is None or isinstance(value, (bool, str, float)):
        return "", value
    if isinstance(value, int):
        if -(2**63) <= value < 2**63:
            return "", value
        return "I", str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "", bytes(value)
    if isinstance(value, datetime.datetime):
        return "T", value.isoformat()
    if isinstance(value, datetime.date):
        return "D", value.isoformat()
    if isinstance(value, datetime.time):
        return "t", value.isoformat()
    if isinstance(value, datetime.timedelta):
        return "d", value // datetime.timedelta(microseconds=1)
    if isinstance(value, decimal.Decimal):
        return "M", str(value)
    if isinstance(value, uuid.UUID):
        return "U", value.hex
    raise UncacheableValue(f"a database value of type {type(value).__name__} can't be cached")


def from_primitive(tag: str, value: Any) -> Any:
    decode = _DECODERS.get(tag)
    return value if decode is None else decode(value)


def _unknown(value: Any) -> Any:
    raise OtherSchema("a user row with a value tag this release doesn't know")


_DECODERS = {
    "I": int,
    "T": datetime.datetime.fromisoformat,
    "D": datetime.date.fromisoformat,
    "t": datetime.time.fromisoformat,
    "d": lambda us: datetime.timedelta(microseconds=us),
    "M": decimal.Decimal,
    "U": uuid.UUID,
}


# --- what can't be cached ---------------------------------------------------------------


@dataclass(frozen=True)
class FieldProblem:
    field: Field
    reason: str


# Column types whose driver values the row holds (SQLite, PostgreSQL, MySQL drivers), by
# Field.get_internal_type(): custom fields built on these (an encrypted TextField) are fine.
SUPPORTED_TYPES = frozenset(
    {
        "AutoField", "BigAutoField", "SmallAutoField", "IntegerField", "BigIntegerField",
        "SmallIntegerField", "PositiveIntegerField", "PositiveBigIntegerField",
        "PositiveSmallIntegerField", "BooleanField", "NullBooleanField", "CharField", "TextField",
        "SlugField", "EmailField", "URLField", "FilePathField", "FileField", "ImageField",
        "FloatField", "DecimalField", "DateTimeField", "DateField", "TimeField", "DurationField",
        "UUIDField", "BinaryField", "JSONField", "GenericIPAddressField", "IPAddressField",
        "ForeignKey", "OneToOneField",
    }
)  # fmt: skip


def unsupported_fields(model: type[Model]) -> list[FieldProblem]:
    """Cached fields whose column type the row can't be trusted to hold (for the system check,
    which has no database row to try): e.g. PostgreSQL's ArrayField, or a custom db_type."""
    return [
        FieldProblem(field, f"its column type ({field.get_internal_type()}) is not one a user row can hold")
        for field in cached_fields(model)
        if field.get_internal_type() not in SUPPORTED_TYPES
    ]


def fields_that_cant_round_trip(user: Model, using: str = "default") -> list[FieldProblem]:
    """The cached fields of a saved `user` whose values don't come back as they went in:
    the driver returns a type the row can't hold, or the value rebuilt from the row differs
    from the one a query builds."""
    model = type(user)
    problems = []
    query = row_query(model, using)
    raw = query.fetch(user.pk)
    if raw is None:
        return [FieldProblem(model._meta.pk, "the user is not in the database")]
    direct = query.build(raw)
    for field, value in zip(cached_fields(model), raw, strict=True):
        try:
            back = from_primitive(*to_primitive(value))
        except UncacheableValue as exc:
            problems.append(FieldProblem(field, str(exc)))
            continue
        if back != value or type(back) is not type(value):
            problems.append(FieldProblem(field, f"{value!r} comes back as {back!r}"))
    if not problems:
        rebuilt = build_user(model, query.cached_values(raw), using, prepared={})
        for field in cached_fields(model):
            if getattr(rebuilt, field.attname) != getattr(direct, field.attname):
                problems.append(FieldProblem(field, "rebuilt differently from a query"))
    return problems
