"""DynamoDB's own behaviour, beyond the conformance suite: its table, its TTL attribute,
and its failures, against moto over real HTTP."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from foxpoll import Order, OrderStatus, StoreUnavailable, adeliver_once, deliver_once
from foxpoll.dedup import AsyncDynamoDBDedupStore, DynamoDBDedupStore
from foxpoll.models import OrderItem

from .services import free_port


def completed() -> Order:
    return Order(id=str(uuid.uuid4()), status=OrderStatus.COMPLETED,
                 items=(OrderItem("p", 1, external_data=("CODE-1",)),))


@pytest.fixture
def client(moto_url: str) -> Any:
    import boto3

    return boto3.client("dynamodb", endpoint_url=moto_url)


def new_table() -> str:
    return f"foxpoll-test-{uuid.uuid4().hex[:8]}"


def test_create_schema_makes_the_table_its_index_and_the_ttl(client: Any) -> None:
    table = new_table()
    store = DynamoDBDedupStore(table, client=client)
    assert store.table == table
    store.create_schema()
    DynamoDBDedupStore(table, client=client).create_schema()  # idempotent
    # One name for the step on every store; the old ones are gone, not aliased.
    for kind in (DynamoDBDedupStore, AsyncDynamoDBDedupStore):
        assert not hasattr(kind, "create_table")
    assert not hasattr(store, "table_name")
    described = client.describe_table(TableName=table)["Table"]
    assert described["TableStatus"] == "ACTIVE"
    assert [i["IndexName"] for i in described["GlobalSecondaryIndexes"]] == ["state-updated_at"]
    ttl = client.describe_time_to_live(TableName=table)["TimeToLiveDescription"]
    assert (ttl["TimeToLiveStatus"], ttl["AttributeName"]) == ("ENABLED", "expires_at")


async def test_the_async_store_creates_its_table_and_delivers_once(
        moto_url: str, client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    table = new_table()
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)  # for the client the store opens
    store = AsyncDynamoDBDedupStore(table)
    try:
        await store.create_schema()
        await store.create_schema()
        order = completed()
        first = await adeliver_once(order, lambda o: "sent", store)
        second = await adeliver_once(order, lambda o: "again", store)
    finally:
        await store.aclose()
    assert (first.delivered, second.delivered) == (True, False)
    assert second.record.receipt == "sent"
    assert client.describe_table(TableName=table)["Table"]["TableStatus"] == "ACTIVE"


@pytest.mark.parametrize("retention", [3600, 0])
def test_delivered_records_carry_a_ttl_only_with_a_retention(client: Any,
                                                             retention: int) -> None:
    table = new_table()
    store = DynamoDBDedupStore(table, client=client, retention=retention)
    store.create_schema()
    order = completed()
    deliver_once(order, lambda o: None, store)
    item = client.get_item(TableName=table, Key={"order_id": {"S": order.id}},
                           ConsistentRead=True)["Item"]
    assert item["state"] == {"S": "delivered"}
    if retention:
        assert 0 < int(item["expires_at"]["N"]) - time.time() <= retention
    else:
        assert "expires_at" not in item


def test_a_missing_table_is_store_unavailable_and_delivers_nothing(client: Any) -> None:
    store = DynamoDBDedupStore(new_table(), client=client)  # create_schema() never called
    calls: list[Order] = []
    with pytest.raises(StoreUnavailable):
        deliver_once(completed(), calls.append, store)
    assert calls == []


@pytest.mark.slow
def test_an_unreachable_endpoint_is_store_unavailable_within_the_timeout() -> None:
    import boto3

    from foxpoll.dedup.dynamodb import bounded_config

    port = free_port()  # nothing listens there
    client = boto3.client("dynamodb", endpoint_url=f"http://127.0.0.1:{port}",
                          config=bounded_config(1.0))
    store = DynamoDBDedupStore(new_table(), client=client)
    calls: list[Order] = []
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        deliver_once(completed(), calls.append, store)
    assert time.monotonic() - started < 10
    assert calls == []
    assert str(port) not in str(info.value)  # no endpoint in the message


@pytest.mark.slow
async def test_an_unreachable_endpoint_is_store_unavailable_on_asyncio(
        monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    store = AsyncDynamoDBDedupStore(new_table(), statement_timeout=1.0)
    try:
        with pytest.raises(StoreUnavailable) as info:
            await store.get("some-order")
    finally:
        await store.aclose()
    assert str(port) not in str(info.value)


def test_a_refusal_that_is_not_a_failed_condition_propagates(client: Any) -> None:
    # Only a failed condition is an answer (the record in the way); a table of another
    # shape is the caller's mistake to see, neither a conflict nor an outage.
    from botocore.exceptions import ClientError

    table = new_table()
    client.create_table(TableName=table, BillingMode="PAY_PER_REQUEST",
                        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
                        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}])
    store = DynamoDBDedupStore(table, client=client)
    calls: list[Order] = []
    with pytest.raises(ClientError) as info:
        deliver_once(completed(), calls.append, store)
    assert info.value.response["Error"]["Code"] == "ValidationException"
    assert calls == []
