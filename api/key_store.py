"""API keys: issued once, stored only as a hash, each with a role, revocable everywhere at once.

A token reads ``olk_<key_id>_<secret>``: the key id finds the row by primary key, the secret
(32 random bytes, URL-safe) is what proves possession. Only the token's SHA-256 is stored.
A fast hash is enough here: a slow, salted hash (bcrypt, argon2) protects low-entropy
passwords against guessing, and a 256-bit random secret cannot be guessed, so a stolen table
gives nothing usable while each request pays microseconds, not the tens of milliseconds a
password hash costs.

Every process and machine shares the table in the event store's database, so a key created
or revoked by one (the CLI, another API instance) is seen by all. Positive lookups are cached
per process for ``cache_ttl`` seconds (``Settings.key_cache_ttl``, default 1 s), so a
revocation takes effect everywhere within that bound; unknown, wrong and revoked tokens are
never cached, so a new key works at once.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from sqlalchemy import (
    Column,
    Connection,
    DateTime,
    Engine,
    MetaData,
    RowMapping,
    String,
    Table,
    func,
    insert,
    or_,
    select,
    update,
)

from projections.engine.database import install_schema, read_model_engine, write_transaction

log = logging.getLogger(__name__)

TOKEN_PREFIX = "olk"  # noqa: S105 (a public marker, not a secret)
_TOKEN = re.compile(rf"{TOKEN_PREFIX}_(?P<key_id>[0-9a-f]{{16}})_(?P<secret>[A-Za-z0-9_-]{{43}})")
MAX_NAME_LENGTH = 200

DEFAULT_CACHE_TTL = 1.0
"""Seconds a process trusts a successful lookup: the longest a revoked key keeps working."""

LAST_USED_RESOLUTION = timedelta(minutes=10)
"""last_used_at is refreshed at most this often per key, so requests never each cost a write."""


class Role(StrEnum):
    """What a key may do.

    A reader reads orders, read models and projection status; a writer also sends commands;
    an auditor also reads the audit log, runs verify and takes checkpoints, and reads what
    admins read (webhooks, effects, keys), but sends no command and changes no configuration;
    an admin may do everything.
    """

    reader = "reader"
    writer = "writer"
    auditor = "auditor"
    admin = "admin"

    def includes(self, other: Role) -> bool:
        """Whether a key with this role may do what ``other`` may."""
        return other in _INCLUDED[self]


_INCLUDED: dict[Role, frozenset[Role]] = {
    Role.reader: frozenset({Role.reader}),
    Role.writer: frozenset({Role.reader, Role.writer}),
    Role.auditor: frozenset({Role.reader, Role.auditor}),
    Role.admin: frozenset(Role),
}


@dataclass(frozen=True)
class Principal:
    """Who sent an authenticated request."""

    key_id: str
    name: str
    role: Role


@dataclass(frozen=True)
class IssuedKey:
    """A key just created: the only time its token exists outside the client's hands."""

    key_id: str
    name: str
    role: Role
    token: str
    created_at: datetime


@dataclass(frozen=True)
class ApiKey:
    """A stored key as listed: never its token."""

    key_id: str
    name: str
    role: Role
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class KeyNotFoundError(LookupError):
    """No key has this id."""


metadata = MetaData()

api_keys = Table(
    "api_keys",
    metadata,
    Column("key_id", String(16), primary_key=True),
    Column("name", String(MAX_NAME_LENGTH), nullable=False),
    Column("role", String(16), nullable=False),
    Column("token_sha256", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True)),
    Column("last_used_at", DateTime(timezone=True)),
)


def token_digest(token: str) -> str:
    """The stored form of a token."""
    return hashlib.sha256(token.encode()).hexdigest()


@functools.lru_cache(maxsize=1024)
def _recent_digest(token: str) -> str:
    """``token_digest``, remembered for the tokens sent lately: the same few keys arrive on
    every request, and hashing each costs more than the cache look-up it leads to."""
    return token_digest(token)


def _utc(moment: datetime) -> datetime:
    """SQLite hands timestamps back without their zone; every stored time is UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _utc_or_none(moment: datetime | None) -> datetime | None:
    return None if moment is None else _utc(moment)


def _now() -> datetime:
    return datetime.now(UTC)


class ApiKeyStore:
    """The api_keys table of one database, with a short per-process cache of good tokens."""

    def __init__(self, engine: Engine, *, cache_ttl: float = DEFAULT_CACHE_TTL) -> None:
        self.engine = engine
        self.cache_ttl = cache_ttl
        self._cache: dict[str, tuple[float, Principal]] = {}
        self._cache_lock = threading.Lock()
        self._revalidating: set[str] = set()
        self._install()

    @classmethod
    def from_url(cls, database_url: str, *, cache_ttl: float = DEFAULT_CACHE_TTL) -> ApiKeyStore:
        """Open the key table in this database (sqlite:///... or postgresql://...), creating it."""
        engine = read_model_engine(database_url)
        try:
            return cls(engine, cache_ttl=cache_ttl)
        except BaseException:
            engine.dispose()
            raise

    def close(self) -> None:
        self.engine.dispose()

    def _install(self) -> None:
        """Create the table (idempotent; safe when several processes start at once)."""
        install_schema(self.engine, functools.partial(metadata.create_all, checkfirst=True))

    # -- issuing and revoking ---------------------------------------------------------------

    def create(self, role: Role, name: str = "") -> IssuedKey:
        """Issue a key; its token is in the result and nowhere else."""
        role = Role(role)
        if len(name) > MAX_NAME_LENGTH:
            raise ValueError(f"a key name has at most {MAX_NAME_LENGTH} characters")
        with write_transaction(self.engine) as conn:
            return _insert_key(conn, role, name)

    def create_first_admin(self, name: str = "bootstrap") -> IssuedKey | None:
        """An admin key if the table has no key at all (revoked ones count), else None.

        Checked and inserted in one write transaction, so two processes starting at once on
        SQLite issue one key; on PostgreSQL a transaction-scoped advisory lock does the same.
        """
        with write_transaction(self.engine) as conn:
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtext('api_keys bootstrap'))")
            if conn.execute(select(func.count()).select_from(api_keys)).scalar_one() > 0:
                return None
            return _insert_key(conn, Role.admin, name)

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key (revoking it again changes nothing); every process stops accepting it
        within cache_ttl seconds."""
        with write_transaction(self.engine) as conn:
            conn.execute(
                update(api_keys)
                .where(api_keys.c.key_id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=_now())
            )
            row = conn.execute(select(api_keys).where(api_keys.c.key_id == key_id)).first()
        if row is None:
            raise KeyNotFoundError(f"no API key has the id {key_id!r}")
        with self._cache_lock:
            self._cache = {d: v for d, v in self._cache.items() if v[1].key_id != key_id}
        return _api_key(row._mapping)

    # -- reading ------------------------------------------------------------------------------

    def list(self) -> list[ApiKey]:
        """Every key, active and revoked, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(api_keys).order_by(api_keys.c.created_at, api_keys.c.key_id))
            return [_api_key(row._mapping) for row in rows]

    def get(self, key_id: str) -> ApiKey:
        with self.engine.connect() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.key_id == key_id)).first()
        if row is None:
            raise KeyNotFoundError(f"no API key has the id {key_id!r}")
        return _api_key(row._mapping)

    def authenticate(self, token: str) -> Principal | None:
        """The key's principal if the token is one we issued and it is not revoked, else None."""
        match = _TOKEN.fullmatch(token)
        if match is None:
            return None
        digest = token_digest(token)
        cached = self._cached(digest)
        if cached is not None:
            return cached
        with self.engine.connect() as conn:
            row = conn.execute(
                select(
                    api_keys.c.name,
                    api_keys.c.role,
                    api_keys.c.token_sha256,
                    api_keys.c.revoked_at,
                    api_keys.c.last_used_at,
                ).where(api_keys.c.key_id == match["key_id"])
            ).first()
        if row is None or row.revoked_at is not None:
            return None
        if not hmac.compare_digest(row.token_sha256, digest):
            return None
        principal = Principal(key_id=match["key_id"], name=row.name, role=Role(row.role))
        with self._cache_lock:
            self._cache[digest] = (time.monotonic() + self.cache_ttl, principal)
        self._note_use(principal.key_id, _utc_or_none(row.last_used_at))
        return principal

    def cached(self, token: str) -> Principal | None:
        """The principal if this process accepted the token under cache_ttl seconds ago.

        No I/O, so the API checks it on the event loop and reads the table only on a miss.
        """
        return self._cached(_recent_digest(token))

    def _cached(self, digest: str) -> Principal | None:
        """The cached principal; past half its time, a background check of the table renews it
        (or drops it, if revoked), so a key in use is never found expired by a burst of
        requests that would all read the table at once."""
        now = time.monotonic()
        with self._cache_lock:
            entry = self._cache.get(digest)
            if entry is None:
                return None
            expires, principal = entry
            if expires <= now:
                del self._cache[digest]
                return None
            renew = expires - now < self.cache_ttl / 2 and digest not in self._revalidating
            if renew:
                self._revalidating.add(digest)
        if renew:
            threading.Thread(target=self._revalidate, args=(digest, principal), daemon=True).start()
        return principal

    def _revalidate(self, digest: str, principal: Principal) -> None:
        checked_at = time.monotonic()
        try:
            with self.engine.connect() as conn:
                row = conn.execute(
                    select(api_keys.c.token_sha256, api_keys.c.revoked_at).where(
                        api_keys.c.key_id == principal.key_id
                    )
                ).first()
            good = (
                row is not None
                and row.revoked_at is None
                and hmac.compare_digest(row.token_sha256, digest)
            )
            with self._cache_lock:
                if not good:
                    self._cache.pop(digest, None)
                elif digest in self._cache:
                    self._cache[digest] = (checked_at + self.cache_ttl, principal)
        except Exception:
            # The entry simply expires; the next request reads the table itself.
            log.warning("could not re-check API key %s", principal.key_id, exc_info=True)
        finally:
            with self._cache_lock:
                self._revalidating.discard(digest)

    def _note_use(self, key_id: str, last_used_at: datetime | None) -> None:
        """Refresh last_used_at when it is older than LAST_USED_RESOLUTION (rarely a write)."""
        now = _now()
        if last_used_at is not None and now - last_used_at < LAST_USED_RESOLUTION:
            return
        stale = now - LAST_USED_RESOLUTION
        with write_transaction(self.engine) as conn:
            conn.execute(
                update(api_keys)
                .where(
                    api_keys.c.key_id == key_id,
                    or_(api_keys.c.last_used_at.is_(None), api_keys.c.last_used_at < stale),
                )
                .values(last_used_at=now)
            )


def _insert_key(conn: Connection, role: Role, name: str) -> IssuedKey:
    """Store a new key's hash and hand back its token, inside the caller's transaction."""
    key_id = secrets.token_hex(8)
    token = f"{TOKEN_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
    name = name or f"{role}-{key_id[:6]}"
    created_at = _now()
    conn.execute(
        insert(api_keys).values(
            key_id=key_id,
            name=name,
            role=role.value,
            token_sha256=token_digest(token),
            created_at=created_at,
        )
    )
    return IssuedKey(key_id=key_id, name=name, role=role, token=token, created_at=created_at)


def _api_key(row: RowMapping) -> ApiKey:
    return ApiKey(
        key_id=row["key_id"],
        name=row["name"],
        role=Role(row["role"]),
        created_at=_utc(row["created_at"]),
        revoked_at=_utc_or_none(row["revoked_at"]),
        last_used_at=_utc_or_none(row["last_used_at"]),
    )
