"""``DynamoDBDedupStore``: conditional ``UpdateItem`` per transition (boto3 / aioboto3).

Every transition is one ``UpdateItem`` whose ``ConditionExpression`` states the transition's
precondition; when it fails, ``ReturnValuesOnConditionCheckFailure=ALL_OLD`` returns the
record in the way, so no second read is needed. Reads are strongly consistent. DynamoDB
has no server clock: the caller's clock is used (keep hosts NTP-synced; leases of a minute
tolerate skew of a few seconds). ``expires_at`` is a TTL attribute, for clean-up only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

try:
    import boto3
    from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
    from botocore.exceptions import BotoCoreError, ClientError
except ImportError as exc:  # pragma: no cover - only without the extra
    raise ImportError("DynamoDBDedupStore needs boto3: pip install 'foxpoll[dynamodb]'") from exc

import attrs

from foxpoll._aws import AsyncClient, bounded_config
from foxpoll._clock import Clock, SystemClock
from foxpoll._core import check_timeout
from foxpoll._io import Flow, Op, arun, pause, run

from ._flows import FlowStore
from .base import (
    AsyncDedupStore,
    ClaimResult,
    DedupStore,
    DeliveryRecord,
    DeliveryState,
    check_retention,
    lease_lost,
    record_from_fields,
    unavailable,
)

__all__ = ["AsyncDynamoDBDedupStore", "DynamoDBDedupStore"]

THIRTY_DAYS = 30 * 24 * 3600
STATE_INDEX = "state-updated_at"
_serialize = TypeSerializer().serialize
_deserialize = TypeDeserializer().deserialize

_NAMES = {"#state": "state", "#token": "token"}
_CLAIM_CONDITION = (
    "attribute_not_exists(order_id) OR #state = :released"
    " OR (#state = :claimed AND lease_until <= :now)"
)
_OWNED_CONDITION = "#state = :claimed AND #token = :token"
_UNAVAILABLE_CODES = frozenset({
    "ProvisionedThroughputExceededException", "ThrottlingException", "RequestLimitExceeded",
    "InternalServerError", "ServiceUnavailable", "ResourceNotFoundException",
})


@attrs.frozen
class Request(Op[dict[str, Any]]):
    """Send a DynamoDB request (``operation`` is the client method, ``update_item`` say);
    resume with its response. Its ``ClientError`` (a failed condition among them) is
    thrown into the flow."""

    operation: str
    params: Mapping[str, Any]


def _values(**values: Any) -> dict[str, Any]:
    return {f":{k}": _serialize(Decimal(str(v)) if isinstance(v, float) else v)
            for k, v in values.items()}


def _record(item: Mapping[str, Any]) -> DeliveryRecord:
    return record_from_fields({k: _deserialize(v) for k, v in item.items()})


@attrs.frozen
class DynamoDBFlows:
    table: str
    retention: int
    clock: Callable[[], float]

    def setup(self) -> Flow[None]:
        """Create the table (unless it exists), wait until it is active, enable the TTL."""
        try:
            yield from Request("create_table", table_definition(self.table))
        except ClientError as exc:
            if _code(exc) != "ResourceInUseException":
                raise
        for _ in range(120):
            reply = yield from Request("describe_table", {"TableName": self.table})
            if reply["Table"]["TableStatus"] == "ACTIVE":
                break
            yield from pause(1.0)
        else:
            raise TimeoutError(f"table {self.table} did not become active")
        ttl = yield from Request("describe_time_to_live", {"TableName": self.table})
        if ttl["TimeToLiveDescription"].get("TimeToLiveStatus") not in ("ENABLED", "ENABLING"):
            yield from Request("update_time_to_live", {
                "TableName": self.table,
                "TimeToLiveSpecification": {"Enabled": True, "AttributeName": "expires_at"},
            })

    def _key(self, order_id: str) -> dict[str, Any]:
        return {"order_id": {"S": order_id}}

    def _update(self, params: dict[str, Any]) -> Flow[tuple[bool, Mapping[str, Any] | None]]:
        """An ``UpdateItem`` returning the item: ``(True, the item as updated)``, or, when
        its condition failed, ``(False, the item in the way, or None)``."""
        try:
            reply = yield from Request("update_item", {
                **params,
                "TableName": self.table,
                "ReturnValues": "ALL_NEW",
                "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
            })
        except ClientError as exc:
            if _code(exc) != "ConditionalCheckFailedException":
                raise
            return False, exc.response.get("Item")
        return True, reply["Attributes"]

    def claim(self, order_id: str, token: str, lease: float) -> Flow[ClaimResult]:
        now = self.clock()
        updated, item = yield from self._update({
            "Key": self._key(order_id),
            "UpdateExpression": (
                "SET #state = :claimed, #token = :token, lease_until = :lease_until, "
                "updated_at = :now, created_at = if_not_exists(created_at, :now) "
                "ADD attempts :one"
            ),
            "ConditionExpression": _CLAIM_CONDITION,
            "ExpressionAttributeNames": _NAMES,
            "ExpressionAttributeValues": _values(
                claimed="claimed", released="released", token=token,
                lease_until=now + lease, now=now, one=1,
            ),
        })
        if not item:
            raise lease_lost(order_id, None)
        return ClaimResult(updated, _record(item), now)

    def _owned(
        self, order_id: str, token: str, update: str, **values: Any
    ) -> Flow[tuple[DeliveryRecord | None, DeliveryRecord | None]]:
        """(the updated record, None) or (None, the record in the way)."""
        updated, item = yield from self._update({
            "Key": self._key(order_id),
            "UpdateExpression": update,
            "ConditionExpression": _OWNED_CONDITION,
            "ExpressionAttributeNames": _NAMES,
            "ExpressionAttributeValues": _values(claimed="claimed", token=token, **values),
        })
        record = _record(item) if item else None
        return (record, None) if updated else (None, record)

    def complete(
        self, order_id: str, token: str, payload_hash: str, receipt: str | None
    ) -> Flow[DeliveryRecord]:
        now = self.clock()
        update = ("SET #state = :delivered, payload_hash = :hash, delivered_at = :now, "
                  "updated_at = :now")
        values: dict[str, Any] = {"delivered": "delivered", "hash": payload_hash, "now": now}
        if receipt is not None:
            update += ", receipt = :receipt"
            values["receipt"] = receipt
        if self.retention > 0:
            update += ", expires_at = :expires"
            values["expires"] = int(now + self.retention)
        done, other = yield from self._owned(order_id, token, update + " REMOVE lease_until",
                                             **values)
        if done is not None:
            return done
        if other is not None and other.state is DeliveryState.DELIVERED and other.token == token:
            return other  # completing twice with the same token is a no-op
        raise lease_lost(order_id, other)

    def release(self, order_id: str, token: str) -> Flow[DeliveryRecord]:
        done, other = yield from self._owned(
            order_id, token, "SET #state = :released, updated_at = :now REMOVE lease_until",
            released="released", now=self.clock(),
        )
        if done is None:
            raise lease_lost(order_id, other)
        return done

    def renew(self, order_id: str, token: str, lease: float) -> Flow[DeliveryRecord]:
        now = self.clock()
        done, other = yield from self._owned(
            order_id, token, "SET lease_until = :lease_until, updated_at = :now",
            lease_until=now + lease, now=now,
        )
        if done is None:
            raise lease_lost(order_id, other)
        return done

    def get(self, order_id: str) -> Flow[DeliveryRecord | None]:
        reply = yield from Request("get_item", {"TableName": self.table,
                                                "Key": self._key(order_id),
                                                "ConsistentRead": True})
        item = reply.get("Item")
        return _record(item) if item else None

    def list(self, state: DeliveryState, limit: int) -> Flow[list[DeliveryRecord]]:
        records: list[DeliveryRecord] = []
        start: Any = None
        while len(records) < limit:
            params: dict[str, Any] = {
                "TableName": self.table, "IndexName": STATE_INDEX,
                "KeyConditionExpression": "#state = :state",
                "ExpressionAttributeNames": {"#state": "state"},
                "ExpressionAttributeValues": _values(state=state.value),
                "ScanIndexForward": True, "Limit": limit - len(records),
            }
            if start is not None:
                params["ExclusiveStartKey"] = start
            reply = yield from Request("query", params)
            records.extend(_record(item) for item in reply.get("Items", []))
            start = reply.get("LastEvaluatedKey")
            if start is None:
                break
        return records


def table_definition(table: str) -> dict[str, Any]:
    """The ``create_table`` parameters: key ``order_id``, an index by state and change time."""
    return {
        "TableName": table,
        "KeySchema": [{"AttributeName": "order_id", "KeyType": "HASH"}],
        "AttributeDefinitions": [
            {"AttributeName": "order_id", "AttributeType": "S"},
            {"AttributeName": "state", "AttributeType": "S"},
            {"AttributeName": "updated_at", "AttributeType": "N"},
        ],
        "GlobalSecondaryIndexes": [{
            "IndexName": STATE_INDEX,
            "KeySchema": [{"AttributeName": "state", "KeyType": "HASH"},
                          {"AttributeName": "updated_at", "KeyType": "RANGE"}],
            "Projection": {"ProjectionType": "ALL"},
        }],
        "BillingMode": "PAY_PER_REQUEST",
    }


def _code(exc: ClientError) -> object:
    return exc.response.get("Error", {}).get("Code")


def _is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, ClientError):
        return _code(exc) in _UNAVAILABLE_CODES
    return isinstance(exc, BotoCoreError)  # connection, timeout and endpoint errors


def _mapped(exc: ClientError | BotoCoreError) -> Exception:
    return unavailable("DynamoDB", exc) if _is_unavailable(exc) else exc


class DynamoDBDedupStore(FlowStore, DedupStore):
    """A dedup store in a DynamoDB table.

    Args:
        where: The table's name (see :meth:`create_schema`): in DynamoDB a table is the
            place, and the client only the way there.
        client: Your boto3 DynamoDB client (its own timeouts apply), never closed by the
            store; when None, the store makes ``boto3.client("dynamodb")`` (configured
            by the environment, as boto3 does) bounded by the timeouts below, and
            :meth:`close` closes it.
        retention: Seconds before a DELIVERED record's TTL (0: no TTL attribute).
        clock: The store's time, read with ``clock.time()``.
        connect_timeout: Seconds each connect of the store's own client may take.
        statement_timeout: Seconds each read of the store's own client may take
            (botocore's default is 60, retried up to four times).

    Attributes:
        table: The table's name (``where``).
    """

    def __init__(
        self,
        where: str,
        *,
        client: Any = None,
        retention: int = THIRTY_DAYS,
        clock: Clock | None = None,
        connect_timeout: float = 5.0,
        statement_timeout: float = 5.0,
    ) -> None:
        check_timeout(connect_timeout, "connect_timeout")
        check_timeout(statement_timeout, "statement_timeout")
        self.table = where
        self._owns = client is None
        self._client = client if client is not None else boto3.client(
            "dynamodb", config=bounded_config(statement_timeout, connect_timeout))
        self._flows: DynamoDBFlows = DynamoDBFlows(where, check_retention(retention),
                                                   (clock or SystemClock()).time)

    def close(self) -> None:
        """Close the store's own client (a client you passed in stays open)."""
        if self._owns:
            self._client.close()

    def create_schema(self) -> None:
        """Create the table and its index (idempotent), wait for it, and enable the TTL."""
        self._run(self._flows.setup())

    def _perform(self, request: Op[Any]) -> Any:
        if not isinstance(request, Request):
            raise TypeError(f"no driver performs {type(request).__name__}")
        return getattr(self._client, request.operation)(**request.params)

    def _run(self, flow: Flow[Any]) -> Any:
        try:
            return run(flow, self._perform, clock=SystemClock())
        except (ClientError, BotoCoreError) as exc:
            raise _mapped(exc) from exc


class AsyncDynamoDBDedupStore(FlowStore, AsyncDedupStore):
    """:class:`DynamoDBDedupStore` on aioboto3.

    Args:
        where: The table's name.
        client: An entered aioboto3 DynamoDB client (``async with session.client(...)``),
            never closed by the store; when None, one is opened on first use (configured
            by the environment, bounded by the timeouts below) and closed by
            :meth:`aclose`.
        retention: As for :class:`DynamoDBDedupStore`.
        clock: As for :class:`DynamoDBDedupStore`.
        connect_timeout: As for :class:`DynamoDBDedupStore`.
        statement_timeout: As for :class:`DynamoDBDedupStore`.
    """

    def __init__(
        self,
        where: str,
        *,
        client: Any = None,
        retention: int = THIRTY_DAYS,
        clock: Clock | None = None,
        connect_timeout: float = 5.0,
        statement_timeout: float = 5.0,
    ) -> None:
        check_timeout(connect_timeout, "connect_timeout")
        check_timeout(statement_timeout, "statement_timeout")
        self.table = where
        self._client = AsyncClient("dynamodb", client, connect_timeout=connect_timeout,
                                   statement_timeout=statement_timeout)
        self._flows: DynamoDBFlows = DynamoDBFlows(where, check_retention(retention),
                                                   (clock or SystemClock()).time)

    async def create_schema(self) -> None:
        """See :meth:`DynamoDBDedupStore.create_schema`."""
        await self._run(self._flows.setup())

    async def _perform(self, request: Op[Any]) -> Any:
        if not isinstance(request, Request):
            raise TypeError(f"no driver performs {type(request).__name__}")
        client = await self._client.get()
        return await getattr(client, request.operation)(**request.params)

    async def _run(self, flow: Flow[Any]) -> Any:
        try:
            return await arun(flow, self._perform, clock=SystemClock())
        except (ClientError, BotoCoreError) as exc:
            raise _mapped(exc) from exc

    async def aclose(self) -> None:
        """Close the store's own client (a client you passed in stays open)."""
        await self._client.aclose()
