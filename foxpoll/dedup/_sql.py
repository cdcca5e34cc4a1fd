"""The SQL of the SQLite and PostgreSQL stores: one statement per transition, shared.

Statements use ``:name`` parameters and ``{now}`` for the current time, in seconds since
the epoch: a parameter on SQLite (embedded, so the process clock is the store's clock), the
server's ``statement_timestamp()`` on PostgreSQL. Times are stored as epoch seconds
(double precision) so every backend reads them the same way.
"""

from __future__ import annotations

import re

import attrs

__all__ = ["COLUMNS", "POSTGRES", "SQLITE", "Dialect"]

COLUMNS = (
    "order_id", "state", "token", "lease_until", "attempts", "payload_hash", "receipt",
    "created_at", "updated_at", "delivered_at",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS {table} (
    order_id      TEXT PRIMARY KEY,
    state         TEXT NOT NULL CHECK (state IN ('claimed', 'delivered', 'released')),
    token         TEXT,
    lease_until   DOUBLE PRECISION,
    attempts      INTEGER NOT NULL DEFAULT 0,
    payload_hash  TEXT,
    receipt       TEXT,
    created_at    DOUBLE PRECISION NOT NULL,
    updated_at    DOUBLE PRECISION NOT NULL,
    delivered_at  DOUBLE PRECISION
)"""

_INDEX = "CREATE INDEX IF NOT EXISTS {table}_state_updated ON {table} (state, updated_at)"

# Insert a new claim, or take over a released or expired one; RETURNING gives a row only
# when this token won. A live claim or a delivered record is left alone. The hot path
# (claim, complete) returns only what the caller does not know already.
_CLAIM = """
INSERT INTO {table} (order_id, state, token, lease_until, attempts, created_at, updated_at)
VALUES (:order_id, 'claimed', :token, {now} + :lease, 1, {now}, {now})
ON CONFLICT (order_id) DO UPDATE SET
    state = 'claimed',
    token = excluded.token,
    lease_until = excluded.lease_until,
    attempts = {table}.attempts + 1,
    updated_at = excluded.updated_at
WHERE {table}.state = 'released'
   OR ({table}.state = 'claimed' AND {table}.lease_until <= excluded.updated_at)
RETURNING lease_until, attempts, created_at, {now} AS now"""

_COMPLETE = """
UPDATE {table} SET state = 'delivered', payload_hash = :payload_hash, receipt = :receipt,
    lease_until = NULL, delivered_at = {now}, updated_at = {now}
WHERE order_id = :order_id AND token = :token AND state = 'claimed'
RETURNING attempts, created_at, delivered_at"""

_RELEASE = """
UPDATE {table} SET state = 'released', lease_until = NULL, updated_at = {now}
WHERE order_id = :order_id AND token = :token AND state = 'claimed'
RETURNING {columns}"""

_RENEW = """
UPDATE {table} SET lease_until = {now} + :lease, updated_at = {now}
WHERE order_id = :order_id AND token = :token AND state = 'claimed'
RETURNING {columns}"""

_GET = "SELECT {columns}, {now} AS now FROM {table} WHERE order_id = :order_id"

_LIST = """
SELECT {columns} FROM {table} WHERE state = :state ORDER BY updated_at, order_id LIMIT :limit"""

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


@attrs.frozen
class Dialect:
    """How one database spells parameters and the current time."""

    now: str
    param_style: str  # "named" (:name) or "pyformat" (%(name)s)

    skip_locked: str = ""  # the row-lock clause that lets concurrent takers pass each other

    def render(self, template: str, table: str, columns: tuple[str, ...] = COLUMNS) -> str:
        if not _IDENTIFIER.fullmatch(table):
            raise ValueError(f"table name must be a plain SQL identifier, not {table!r}")
        sql = template.format(table=table, now=self.now, columns=", ".join(columns),
                              skip_locked=self.skip_locked)
        if self.param_style == "pyformat":
            sql = re.sub(r"(?<!:):([a-z_]+)", r"%(\1)s", sql)
        return sql

    def statements(self, table: str) -> Statements:
        return Statements(**{
            name: self.render(template, table)
            for name, template in (
                ("schema", _SCHEMA), ("index", _INDEX), ("claim", _CLAIM),
                ("complete", _COMPLETE), ("release", _RELEASE), ("renew", _RENEW),
                ("get", _GET), ("list", _LIST),
            )
        })


@attrs.frozen
class Statements:
    schema: str
    index: str
    claim: str
    complete: str
    release: str
    renew: str
    get: str
    list: str


SQLITE = Dialect(now=":now", param_style="named")
POSTGRES = Dialect(now="EXTRACT(EPOCH FROM statement_timestamp())::double precision",
                   param_style="pyformat", skip_locked="FOR UPDATE SKIP LOCKED")
