"""What the AWS classes (the DynamoDB stores, the SQS publishers) share: botocore settings
that bound each call, and an aioboto3 client opened on first use.

A client made by foxpoll is configured as boto3 configures one from the environment
(``AWS_REGION``, ``AWS_ENDPOINT_URL``, credentials...), plus :func:`bounded_config`; a
caller who needs anything else passes a client of their own.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["AsyncClient", "bounded_config"]


def bounded_config(statement_timeout: float, connect_timeout: float | None = None) -> Any:
    """A botocore config whose reads end within ``statement_timeout`` and connects within
    ``connect_timeout`` (``statement_timeout`` when None), with one retry: a call then
    ends within about twice that, not minutes (botocore's default read timeout is 60 s,
    retried up to four times)."""
    from botocore.config import Config

    connect = statement_timeout if connect_timeout is None else connect_timeout
    return Config(connect_timeout=connect, read_timeout=statement_timeout,
                  retries={"max_attempts": 2, "mode": "standard"})


class AsyncClient:
    """An aioboto3 client of one service: the caller's, used as it is and never closed;
    or, when None, one opened on first use with :func:`bounded_config` and closed by
    :meth:`aclose`.

    aioboto3 opens a client with ``async with``, in a running loop: so not in the
    constructor of the object that needs it.
    """

    def __init__(self, service: str, client: Any, *, connect_timeout: float,
                 statement_timeout: float) -> None:
        self._service = service
        self._client = client
        self._config = bounded_config(statement_timeout, connect_timeout)
        self._context: Any = None  # the client's context, when it is ours to close
        self._opening = asyncio.Lock()

    async def get(self) -> Any:
        """The client, opened now if it is not yet."""
        if self._client is None:
            async with self._opening:  # concurrent first calls share one client
                if self._client is None:
                    import aioboto3

                    context = aioboto3.Session().client(self._service, config=self._config)
                    self._client = await context.__aenter__()
                    self._context = context
        return self._client

    async def aclose(self) -> None:
        """Close the client if it was opened here (a client passed in stays open); the
        next :meth:`get` opens another."""
        if self._context is not None:
            context, self._context, self._client = self._context, None, None
            await context.__aexit__(None, None, None)
