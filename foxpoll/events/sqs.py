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
        queue_url: The queue's URL.
        client: A boto3 SQS client; ``boto3.client("sqs")`` when None.
    """

    def __init__(self, queue_url: str, client: Any = None) -> None:
        if client is None:
            import boto3

            client = boto3.client("sqs")
        self._client = client
        self._message = _Message(queue_url)

    def publish(self, event: OrderEvent) -> str:
        with unavailable_on("SQS", *_UNREACHED):
            reply = self._client.send_message(**self._message.params(event))
        return str(reply["MessageId"])


class AsyncSQSPublisher:
    """:class:`SQSPublisher` on an entered aioboto3 SQS client."""

    def __init__(self, queue_url: str, client: Any) -> None:
        self._client = client
        self._message = _Message(queue_url)

    async def publish(self, event: OrderEvent) -> str:
        with unavailable_on("SQS", *_UNREACHED):
            reply = await self._client.send_message(**self._message.params(event))
        return str(reply["MessageId"])
