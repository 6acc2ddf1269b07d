"""Personal data in an immutable ledger: encrypted per customer, erased by deleting the key.

Every personal value an event holds (an email, an address, a free-text reference, a tracking
number) is stored sealed: AES-GCM (the ``cryptography`` package) under a data key of its own
customer, with the customer's id as associated data. Data keys live in the
``customer_data_keys`` table, each wrapped (AES-GCM again) by the master key from
``ORDERLEDGER_MASTER_KEY``. Erasing a customer deletes their data keys: every copy of the
ciphertext (the store, backups, replicas, the WAL) becomes unreadable, while the events, their
totals and their hash chains stay as they were. A sealed value whose key is gone reads as
``ERASED``.

Each process keeps the keys it used in a bounded cache. Every erasure counts itself in
``customer_data_key_erasures``, in the transaction that deletes the keys; a process reads that
count at most every ``cache_ttl`` seconds and empties its cache when it changed. So an erasure
takes effect in every process within that time (at once in the process that erased), and a
returning customer's key is read from the database once per process, not once per order.
"""

from __future__ import annotations

import base64
import binascii
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from hashlib import sha256
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from eventsourcing.domain import Aggregate, event
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    DateTime,
    Engine,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Select,
    String,
    Table,
    bindparam,
    create_engine,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect

from domain.eventstore import DATA_KEYS_TABLE
from domain.schema import changing_schema_alone

ERASED = "[erased]"
"""What a personal value reads as once its customer's data keys were erased."""

MASTER_KEY_SETTING = "ORDERLEDGER_MASTER_KEY"
_NONCE = 12
_KEY_ID_BYTES = 8

metadata = MetaData()
data_keys = Table(
    DATA_KEYS_TABLE,
    metadata,
    Column("key_id", String(16), primary_key=True),
    Column("customer_id", String(64), nullable=False),
    Column("wrapped_key", LargeBinary, nullable=False),
    Column("master_key_id", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("customer_data_keys_customer", "customer_id"),
)


erasures = Table(
    "customer_data_key_erasures",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("erased", BigInteger, nullable=False),
)
"""One row: how many erasures the store has seen, for every process's cache to notice."""


class MasterKeyError(ValueError):
    """The master key is missing, malformed, or not the one the store's data keys need."""


class SealedValueError(ValueError):
    """A sealed value failed authentication: it was changed after it was sealed."""


SEALED = "sealed"
"""The transcoding name of a sealed value in a stored event."""


class SealedValue:
    """A personal value as a projection reads it: opened only when asked (``reveal``)."""

    __slots__ = ("_data", "_open")

    def __init__(self, data: Any, opener: Callable[[Any], Any]) -> None:
        self._data = data
        self._open = opener

    def open(self) -> str:
        return str(self._open(self._data))

    def __repr__(self) -> str:
        return "SealedValue(...)"


def reveal(value: Any) -> Any:
    """A personal value as text (or ERASED), whether it was read opened or not."""
    return value.open() if isinstance(value, SealedValue) else value


@dataclass(frozen=True)
class Sealed:
    """A personal value on its way into the store, and the customer whose key seals it."""

    customer_id: str
    text: str


def parse_master_key(text: str) -> bytes:
    """32 bytes from 64 hex digits or URL-safe base64; a clear error naming the setting."""
    value = text.strip()
    try:
        key = bytes.fromhex(value) if len(value) == 64 else base64.urlsafe_b64decode(value)
    except (ValueError, binascii.Error):
        key = b""
    if len(key) != 32:
        raise MasterKeyError(
            f"{MASTER_KEY_SETTING} must be 32 bytes as 64 hex digits or URL-safe base64, e.g. "
            "from: python -c 'import os, base64; print(base64.urlsafe_b64encode(os.urandom(32))"
            ".decode())'"
        )
    return key


def new_master_key() -> str:
    """A fresh master key, as ORDERLEDGER_MASTER_KEY reads it."""
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


def master_key_id(key: bytes) -> str:
    """A short public name for a master key: which one wrapped a data key."""
    return sha256(b"orderledger master key\0" + key).hexdigest()[:16]


@dataclass
class NewKeys:
    """Data keys made while sealing one save's events, to be stored in its transaction."""

    keys: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    """Rows of customer_data_keys: key_id, customer_id, wrapped_key, master_key_id,
    created_at."""


_collecting: ContextVar[NewKeys | None] = ContextVar("orderledger_new_keys", default=None)


class _Cache:
    """Data keys by key id, and each customer's key for sealing: the most recently used."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str], Any] = OrderedDict()

    def get(self, kind: str, name: str) -> Any:
        with self._lock:
            found = self._entries.get((kind, name))
            if found is not None:
                self._entries.move_to_end((kind, name))
            return found

    def put(self, kind: str, name: str, value: Any) -> None:
        with self._lock:
            self._entries[(kind, name)] = value
            self._entries.move_to_end((kind, name))
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def forget(self, customer_id: str, key_ids: Iterable[str]) -> None:
        with self._lock:
            self._entries.pop(("customer", customer_id), None)
            for key_id in key_ids:
                self._entries.pop(("key", key_id), None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


KEY_READER = "orderledger data keys"
"""The application_name of the connections that read data keys (see pg_stat_activity)."""


class _Statement:
    """A query compiled once for a dialect, for its driver's cursor: SQL text and the
    arguments in the driver's parameter style."""

    def __init__(self, name: str, query: Select[Any], dialect: Dialect) -> None:
        self.name = name
        self._compiled = query.compile(dialect=dialect)
        self.sql = str(self._compiled)

    def arguments(self, values: dict[str, Any]) -> Sequence[Any] | Mapping[str, Any]:
        params = self._compiled.construct_params(values)
        if self._compiled.positional:
            return [params[name] for name in self._compiled.positiontup or ()]
        return params


class PersonalData:
    """Seals and opens personal values with per-customer data keys; erases customers."""

    def __init__(
        self,
        engine: Engine,
        master_key: bytes,
        *,
        write: Callable[[], AbstractContextManager[Connection]] | None = None,
        previous_master_keys: Iterable[bytes] = (),
        cache_ttl: float = 5.0,
        cache_size: int = 10_000,
    ) -> None:
        self.engine = engine
        self._write = write or engine.begin
        """A write transaction: the store's own (one writer at a time on SQLite)."""
        self._master = master_key
        self._master_id = master_key_id(master_key)
        self._masters = {master_key_id(k): k for k in (*previous_master_keys, master_key)}
        self._cache = _Cache(cache_size)
        self._check_every = cache_ttl
        self._erased: int | None = None
        self._next_check = 0.0
        # Key look-ups read one row, on the write path of a customer's first order in a
        # process. They have connections of their own in autocommit: no BEGIN, ROLLBACK or
        # isolation reset around the read, and no ping before it (a connection found dead is
        # replaced and the read tried again). About half the cost of a read-model read.
        postgres = engine.dialect.name == "postgresql"
        self._reads = create_engine(
            engine.url,
            isolation_level="AUTOCOMMIT",
            pool_size=4,
            max_overflow=8,
            connect_args={"application_name": KEY_READER} if postgres else {"timeout": 30},
        )
        dialect = self._reads.dialect
        self._newest_key = _Statement(
            "customer's key",
            select(data_keys.c.key_id, data_keys.c.wrapped_key, data_keys.c.master_key_id)
            .where(data_keys.c.customer_id == bindparam("customer_id"))
            .order_by(data_keys.c.created_at.desc())
            .limit(1),
            dialect,
        )
        self._key_by_id = _Statement(
            "key",
            select(data_keys.c.wrapped_key, data_keys.c.master_key_id).where(
                data_keys.c.key_id == bindparam("key_id")
            ),
            dialect,
        )
        self._erased_count = _Statement(
            "erasures", select(erasures.c.erased).where(erasures.c.id == 1), dialect
        )
        self.reads: Counter[str] = Counter()
        """How many times this process read the database, by what it read: a customer's
        key, a key by its id, or the count of erasures."""

    def install(self) -> None:
        """Create the tables; refuse a master key that did not wrap the keys already there."""
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        with self._write() as conn:
            changing_schema_alone(conn)
            metadata.create_all(conn, checkfirst=True)
            conn.execute(dialect.insert(erasures).values(id=1, erased=0).on_conflict_do_nothing())
        with self.engine.connect() as conn:
            used = {row[0] for row in conn.execute(select(data_keys.c.master_key_id).distinct())}
        unknown = used - set(self._masters)
        if unknown:
            raise MasterKeyError(
                f"{MASTER_KEY_SETTING} is not the master key that wrapped this store's data "
                f"keys (they name master key {', '.join(sorted(unknown))}; this one is "
                f"{self._master_id}): set the right key, or give the old one in "
                "ORDERLEDGER_PREVIOUS_MASTER_KEYS and run orderledger customers rotate-key"
            )

    def close(self) -> None:
        self._reads.dispose()
        self.engine.dispose()

    # -- sealing ------------------------------------------------------------------------------

    def seal(self, customer_id: str, text: str) -> dict[str, str]:
        """The stored form of a personal value: the key's id, a nonce and the ciphertext."""
        key_id, key = self._sealing_key(customer_id)
        nonce = os.urandom(_NONCE)
        sealed = AESGCM(key).encrypt(nonce, text.encode(), customer_id.encode())
        return {"c": customer_id, "k": key_id, "v": _b64(nonce + sealed)}

    def open(self, stored: dict[str, Any]) -> str:
        """The value as it was sealed, or ERASED when its key is gone."""
        customer_id, key_id = str(stored["c"]), str(stored["k"])
        key = self._key(key_id)
        if key is None:
            return ERASED
        blob = base64.urlsafe_b64decode(stored["v"])
        try:
            return AESGCM(key).decrypt(blob[:_NONCE], blob[_NONCE:], customer_id.encode()).decode()
        except InvalidTag:
            raise SealedValueError(
                f"a personal value of customer {customer_id} does not match its seal"
            ) from None

    @contextmanager
    def collecting(self) -> Iterator[NewKeys]:
        """Keys made for new customers while the block runs are not stored on their own: they
        are handed out (``NewKeys.rows``) for the event store to insert in the transaction that
        records the events sealed with them, and cached once ``committed`` is called."""
        new_keys = NewKeys()
        token = _collecting.set(new_keys)
        try:
            yield new_keys
        finally:
            _collecting.reset(token)

    def committed(self, new_keys: NewKeys) -> None:
        """The transaction holding ``new_keys`` committed: their customers may use them."""
        for customer_id, (key_id, key) in new_keys.keys.items():
            self._cache.put("customer", customer_id, (key_id, key))
            self._cache.put("key", key_id, key)

    def _notice_erasures(self) -> None:
        """Empty the cache if any process erased a customer since we last looked (we look at
        most every ``cache_ttl`` seconds)."""
        now = time.monotonic()
        if now < self._next_check:
            return
        row = self._read_one(self._erased_count, {})
        erased = 0 if row is None else int(row[0])
        if erased != self._erased:
            self._cache.clear()
            self._erased = erased
        self._next_check = now + self._check_every

    def _sealing_key(self, customer_id: str) -> tuple[str, bytes]:
        self._notice_erasures()
        cached = self._cache.get("customer", customer_id)
        if cached is not None:
            key_id, key = cached
            return str(key_id), bytes(key)
        collecting = _collecting.get()
        if collecting is not None and customer_id in collecting.keys:
            return collecting.keys[customer_id]
        row = self._read_one(self._newest_key, {"customer_id": customer_id})
        if row is not None:
            key_id, key = str(row[0]), self._unwrap(str(row[0]), row[1], str(row[2]))
            self._cache.put("customer", customer_id, (key_id, key))
            self._cache.put("key", key_id, key)
            return key_id, key
        key_id, key = os.urandom(_KEY_ID_BYTES).hex(), AESGCM.generate_key(256)
        new_row = {
            "key_id": key_id,
            "customer_id": customer_id,
            "wrapped_key": self._wrap(key_id, key),
            "master_key_id": self._master_id,
            "created_at": datetime.now(UTC),
        }
        if collecting is not None:
            collecting.keys[customer_id] = (key_id, key)
            collecting.rows.append(new_row)
            return key_id, key
        with self._write() as conn:
            conn.execute(insert(data_keys).values(**new_row))
        self._cache.put("customer", customer_id, (key_id, key))
        self._cache.put("key", key_id, key)
        return key_id, key

    def _key(self, key_id: str) -> bytes | None:
        self._notice_erasures()
        cached = self._cache.get("key", key_id)
        if cached is not None:
            return bytes(cached)
        row = self._read_one(self._key_by_id, {"key_id": key_id})
        if row is None:
            return None
        key = self._unwrap(key_id, row[0], str(row[1]))
        self._cache.put("key", key_id, key)
        return key

    def _read_one(self, statement: _Statement, values: dict[str, Any]) -> tuple[Any, ...] | None:
        """The statement's first row, read on a pooled connection's own driver cursor (a key
        look-up is on the write path: SQLAlchemy's execution costs more than the read). A
        connection found dead (the server restarted since it was last used) is replaced once."""
        self.reads[statement.name] += 1
        for attempt in (1, 2):
            connection = self._reads.raw_connection()
            try:
                cursor = connection.cursor()
                try:
                    cursor.execute(statement.sql, statement.arguments(values))
                    row = cursor.fetchone()
                finally:
                    cursor.close()
                return None if row is None else tuple(row)
            except self._reads.dialect.loaded_dbapi.Error as error:
                if attempt == 2 or not self._reads.dialect.is_disconnect(
                    error, connection.dbapi_connection, None
                ):
                    raise
                connection.invalidate(error)
            finally:
                connection.close()
        raise AssertionError("unreachable")

    def _wrap(self, key_id: str, key: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return nonce + AESGCM(self._master).encrypt(nonce, key, key_id.encode())

    def _unwrap(self, key_id: str, wrapped: bytes, wrapped_by: str) -> bytes:
        master = self._masters.get(wrapped_by)
        if master is None:
            raise MasterKeyError(
                f"data key {key_id} was wrapped by master key {wrapped_by}, which "
                f"{MASTER_KEY_SETTING} is not"
            )
        blob = bytes(wrapped)
        try:
            return AESGCM(master).decrypt(blob[:_NONCE], blob[_NONCE:], key_id.encode())
        except InvalidTag:
            raise MasterKeyError(f"data key {key_id} does not open with its master key") from None

    # -- erasure and rotation -----------------------------------------------------------------

    def erase(self, customer_id: str) -> int:
        """Delete every data key of the customer; how many there were.

        The deleted rows leave no bytes behind in our files: SQLite overwrites them
        (``secure_delete``) and its WAL is checkpointed and truncated; PostgreSQL's table is
        vacuumed. Backups and replicas keep the wrapped keys until they expire: rotating the
        master key makes those copies useless too.
        """
        sqlite = self.engine.dialect.name == "sqlite"
        with self._write() as conn:
            if sqlite:
                conn.exec_driver_sql("PRAGMA secure_delete = ON")
            key_ids = [
                row[0]
                for row in conn.execute(
                    select(data_keys.c.key_id).where(data_keys.c.customer_id == customer_id)
                )
            ]
            conn.execute(delete(data_keys).where(data_keys.c.customer_id == customer_id))
            conn.execute(update(erasures).values(erased=erasures.c.erased + 1))
        self._cache.forget(customer_id, key_ids)
        if sqlite:
            # Outside any transaction, which SQLAlchemy would begin first.
            raw = self.engine.raw_connection()
            try:
                raw.cursor().execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                raw.close()
        else:
            with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql(f"VACUUM {DATA_KEYS_TABLE}")
        return len(key_ids)

    def has_keys(self, customer_id: str) -> bool:
        with self.engine.connect() as conn:
            return (
                conn.execute(
                    select(data_keys.c.key_id).where(data_keys.c.customer_id == customer_id)
                ).first()
                is not None
            )

    def rotate(self) -> int:
        """Re-wrap every data key under the current master key; events stay untouched."""
        count = 0
        with self._write() as conn:
            rows = conn.execute(
                select(data_keys).where(data_keys.c.master_key_id != self._master_id)
            ).all()
            for row in rows:
                key = self._unwrap(row.key_id, row.wrapped_key, row.master_key_id)
                conn.execute(
                    update(data_keys)
                    .where(data_keys.c.key_id == row.key_id)
                    .values(wrapped_key=self._wrap(row.key_id, key), master_key_id=self._master_id)
                )
                count += 1
        return count


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


class PersonalDataErasure(Aggregate):
    """A customer's personal data was erased: who asked (the metadata), when, and why.

    It holds no personal data: the customer's pseudonymous id, the reason as given, and how
    many data keys were deleted.
    """

    class Erased(Aggregate.Created):
        customer_id: str
        reason: str

    @event(Erased)
    def __init__(self, customer_id: str, reason: str) -> None:
        self.customer_id = customer_id
        self.reason = reason
