"""The SQL of the SQLite and PostgreSQL stores: one statement per transition, shared.

Statements use ``:name`` parameters and ``{now}`` for the current time, in seconds since
the epoch: a parameter on SQLite (embedded, so the process clock is the store's clock), the
server's ``statement_timestamp()`` on PostgreSQL. Times are stored as epoch seconds
(double precision) so every backend reads them the same way.
"""

from __future__ import annotations

import hashlib
import re

import attrs

__all__ = ["COLUMNS", "POSTGRES", "SQLITE", "Dialect", "TableName"]

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

_INDEX = "CREATE INDEX IF NOT EXISTS {index} ON {index_on} (state, updated_at)"

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
    attempts = {name}.attempts + 1,
    updated_at = excluded.updated_at
WHERE {name}.state = 'released'
   OR ({name}.state = 'claimed' AND {name}.lease_until <= excluded.updated_at)
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

# A part of a table name: a plain identifier (folded to lower case, as PostgreSQL folds
# unquoted names), or a double-quoted one kept as written ("" stands for one quote).
_PART = r'(?:[A-Za-z_][A-Za-z0-9_$]*|"(?:[^"\x00%]|"")+")'
_TABLE = re.compile(rf"({_PART})(?:\.({_PART}))?")
_MAX_NAME = 63  # bytes: PostgreSQL silently truncates longer names


def _unquote(part: str) -> str:
    if part.startswith('"'):
        return part[1:-1].replace('""', '"')
    return part.lower()


# Not psycopg.sql.Identifier: statements are rendered once, before any connection exists,
# and Identifier needs a connection to render before psycopg 3.2 (the floor is 3.1).
def quote(name: str) -> str:
    """``name`` as a quoted SQL identifier: in double quotes, each quote doubled (what
    libpq's ``PQescapeIdentifier`` and ``psycopg.sql.Identifier`` produce)."""
    return '"' + name.replace('"', '""') + '"'


@attrs.frozen
class TableName:
    """A table name a caller gave, checked and split: ``table`` or ``schema.table``.

    Each part is a plain identifier (``billing``, folded to lower case) or a double-quoted
    one (``"Billing Dept"``); ``%`` and NUL are refused, and so is a part longer than
    63 bytes, which PostgreSQL would silently cut short.
    """

    schema: str | None
    table: str

    @classmethod
    def parse(cls, text: str) -> TableName:
        match = _TABLE.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            raise ValueError(
                f"table name {text!r}: expected table or schema.table, each part a plain "
                'SQL identifier or a double-quoted one ("" for a quote; no % or NUL)')
        first, second = match.group(1), match.group(2)
        schema, table = (_unquote(first), _unquote(second)) if second else (None,
                                                                             _unquote(first))
        for part in (schema, table):
            if part is not None and len(part.encode()) > _MAX_NAME:
                raise ValueError(f"table name {text!r}: each part is at most {_MAX_NAME} "
                                 "bytes")
        return cls(schema, table)

    @property
    def qualified(self) -> str:
        """The quoted name to use in statements."""
        return self.table_only if self.schema is None else (
            f"{quote(self.schema)}.{self.table_only}")

    @property
    def table_only(self) -> str:
        """The quoted table part, which qualifies column names."""
        return quote(self.table)

    def derived(self, suffix: str) -> str:
        """An unquoted name for something of this table's (an index): the table's name and
        ``suffix``, shortened with a digest of the whole when it would pass 63 bytes, so
        two long table names never share one."""
        name = f"{self.table}_{suffix}"
        if len(name.encode()) <= _MAX_NAME:
            return name
        digest = hashlib.sha256(self.table.encode()).hexdigest()[:10]
        head = self.table.encode()[:_MAX_NAME - len(suffix) - 12].decode(errors="ignore")
        return f"{head}_{digest}_{suffix}"


@attrs.frozen
class Dialect:
    """How one database spells parameters, the current time and an index's name."""

    now: str
    param_style: str  # "named" (:name) or "pyformat" (%(name)s)

    skip_locked: str = ""  # the row-lock clause that lets concurrent takers pass each other
    # SQLite names an index in the table's schema and its table without one; PostgreSQL
    # puts the index in the table's schema and names the table in full.
    index_in_schema: bool = False

    def render(self, template: str, table: str | TableName, columns: tuple[str, ...] = COLUMNS,
               index_suffix: str = "state_updated") -> str:
        name = table if isinstance(table, TableName) else TableName.parse(table)
        index = quote(name.derived(index_suffix))
        if self.index_in_schema:
            index_on = name.table_only
            if name.schema is not None:
                index = f"{quote(name.schema)}.{index}"
        else:
            index_on = name.qualified
        if self.param_style == "pyformat":  # before the names go in: they may hold a colon
            template = re.sub(r"(?<!:):([a-z_]+)", r"%(\1)s", template)
        return template.format(table=name.qualified, name=name.table_only, index=index,
                               index_on=index_on, now=self.now, columns=", ".join(columns),
                               skip_locked=self.skip_locked)

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


SQLITE = Dialect(now=":now", param_style="named", index_in_schema=True)
POSTGRES = Dialect(now="EXTRACT(EPOCH FROM statement_timestamp())::double precision",
                   param_style="pyformat", skip_locked="FOR UPDATE SKIP LOCKED")
