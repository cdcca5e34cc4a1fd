"""``SQSPublisher``: completion events on Amazon SQS (boto3 / aioboto3).

On a FIFO queue (its URL ends in ``.fifo``), the event id is the deduplication id and the
order id the message group, so SQS itself drops a repeat within its 5-minute window and
keeps each order's events in order. An SQS endpoint that cannot be reached, or does not
answer within the client's timeouts, raises :class:`~foxpoll.errors.StoreUnavailable`.
"""

from __future__ import annotations

from typing import Any

try:
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError
except ImportError as exc:  # pragma: no cover - only without the extra
    raise ImportError("SQS publishers need boto3: pip install 'foxpoll[dynamodb]'") from exc

import attrs

from foxpoll._aws import AsyncClient, bounded_config
from foxpoll.errors import unavailable_on

from .base import OrderEvent

__all__ = ["AsyncSQSPublisher", "SQSPublisher"]


@attrs.frozen
class _Message:
    queue_url: str

    def params(self, event: OrderEvent) -> dict[str, Any]:
        params: dict[str, Any] = {
            "QueueUrl": self.queue_url,
            "MessageBody": event.to_json(),
            "MessageAttributes": {
                "eventId": {"DataType": "String", "StringValue": event.event_id},
                "status": {"DataType": "String", "StringValue": event.status},
            },
        }
        if self.queue_url.endswith(".fifo"):
            params["MessageDeduplicationId"] = event.event_id
            params["MessageGroupId"] = event.order_id
        return params


#: botocore's connection, endpoint and timeout errors; an answer from SQS (a
#: ``ClientError``) stays what it is.
_UNREACHED = (BotoConnectionError, HTTPClientError)


class SQSPublisher:
    """Publish events to an SQS queue.

    Args:
        where: The queue's URL.
        client: Your boto3 SQS client (its own timeouts apply), never closed by the
            publisher; when None, the publisher makes ``boto3.client("sqs")`` (configured
            by the environment, as boto3 does) bounded by the timeouts below, and
            :meth:`close` closes it.
        connect_timeout: Seconds each connect of the publisher's own client may take.
        statement_timeout: Seconds each read of the publisher's own client may take.
    """

    def __init__(self, where: str, *, client: Any = None, connect_timeout: float = 5.0,
                 statement_timeout: float = 5.0) -> None:
        self._owns = client is None
        if client is None:
            import boto3

            client = boto3.client("sqs", config=bounded_config(statement_timeout,
                                                               connect_timeout))
        self._client = client
        self._message = _Message(where)

    def publish(self, event: OrderEvent) -> str:
        """Send ``event`` to the queue; SQS's id of the message."""
        with unavailable_on("SQS", *_UNREACHED):
            reply = self._client.send_message(**self._message.params(event))
        return str(reply["MessageId"])

    def close(self) -> None:
        """Close the publisher's own client (a client you passed in stays open)."""
        if self._owns:
            self._client.close()

    def __enter__(self) -> SQSPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncSQSPublisher:
    """:class:`SQSPublisher` on aioboto3.

    Args:
        where: The queue's URL.
        client: An entered aioboto3 SQS client (``async with session.client(...)``),
            never closed by the publisher; when None, one is opened on first use
            (configured by the environment, bounded by the timeouts below) and closed by
            :meth:`aclose`.
        connect_timeout: As for :class:`SQSPublisher`.
        statement_timeout: As for :class:`SQSPublisher`.
    """

    def __init__(self, where: str, *, client: Any = None, connect_timeout: float = 5.0,
                 statement_timeout: float = 5.0) -> None:
        self._client = AsyncClient("sqs", client, connect_timeout=connect_timeout,
                                   statement_timeout=statement_timeout)
        self._message = _Message(where)

    async def publish(self, event: OrderEvent) -> str:
        """See :meth:`SQSPublisher.publish`."""
        with unavailable_on("SQS", *_UNREACHED):
            client = await self._client.get()
            reply = await client.send_message(**self._message.params(event))
        return str(reply["MessageId"])

    async def aclose(self) -> None:
        """Close the publisher's own client (a client you passed in stays open)."""
        await self._client.aclose()

    async def __aenter__(self) -> AsyncSQSPublisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
