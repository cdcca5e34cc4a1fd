"""BodyReader, the sans-io part of every response read: any chunking of a gzip, deflate
or plain body decodes to the same bytes, and a body past the size cap is refused with no
more than one byte past it decoded. The same bounds over real sockets are in
test_hostile.py."""

from __future__ import annotations

import itertools
import time
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from foxpoll._senders import BodyReader, UnreadableBody


def _encode(data: bytes, encoding: str) -> bytes:
    wbits = {"gzip": 31, "deflate": 15, "raw-deflate": -15}[encoding]
    packer = zlib.compressobj(6, zlib.DEFLATED, wbits)
    return packer.compress(data) + packer.flush()


class NotYetRead(httpx.SyncByteStream):
    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    def __iter__(self) -> Iterator[bytes]:
        yield from self.pieces


def unread(encoding: str, pieces: list[bytes] | None = None) -> httpx.Response:
    """A response whose body is still to come, as a transport hands it over."""
    return httpx.Response(200, headers={"Content-Encoding": encoding},
                          stream=NotYetRead(pieces or []),
                          request=httpx.Request("GET", "https://h/api/orders/x"))


def read_all(reader: Any, streamed: httpx.Response) -> None:
    """What a sender does: feed the reader the raw chunks."""
    for chunk in streamed.iter_raw():
        reader.feed(chunk)


@given(data=st.binary(max_size=5000), cuts=st.lists(st.integers(0, 6000), max_size=8),
       encoding=st.sampled_from(["gzip", "deflate", "raw-deflate", "identity"]),
       cap=st.integers(1, 6000))
def test_body_reader_decodes_any_chunking_and_refuses_past_the_cap(
        data: bytes, cuts: list[int], encoding: str, cap: int) -> None:
    body = data if encoding == "identity" else _encode(data, encoding)
    header = "deflate" if encoding == "raw-deflate" else encoding
    bounds = sorted({0, len(body), *(c for c in cuts if c < len(body))})
    pieces = [body[start:end] for start, end in itertools.pairwise(bounds)]
    streamed = unread(header, pieces)
    reader = BodyReader(streamed, cap, deadline=time.monotonic() + 60)
    if len(data) > cap:
        with pytest.raises(UnreadableBody) as refused:
            read_all(reader, streamed)
        assert refused.value.too_large
        if encoding != "identity":  # a raw chunk is in memory already; a decoded one is not
            assert reader.size <= cap + 1  # decoding stopped one byte past the cap
        return
    read_all(reader, streamed)
    assert len(data) <= cap
    response = reader.response(streamed)
    assert response.content == data
    if encoding != "identity":  # decoded: httpx must not decode it again
        assert "content-encoding" not in response.headers


def test_an_encoding_foxpoll_did_not_ask_for_is_refused() -> None:
    streamed = unread("br")
    with pytest.raises(UnreadableBody, match="'br', not asked for"):
        BodyReader(streamed, 100, deadline=time.monotonic() + 60)


def test_a_body_still_coming_at_the_deadline_is_a_read_timeout() -> None:
    streamed = unread("identity", [b"{}"])
    reader = BodyReader(streamed, 100, deadline=time.monotonic() - 0.001)
    with pytest.raises(httpx.ReadTimeout, match="deadline"):
        read_all(reader, streamed)


def test_a_body_built_in_memory_is_held_to_the_cap_too() -> None:
    request = httpx.Request("GET", "https://h/api/orders/x")
    assert BodyReader(httpx.Response(200, content=b"x" * 100, request=request), 100,
                      deadline=time.monotonic() + 60).in_memory
    with pytest.raises(UnreadableBody) as refused:
        BodyReader(httpx.Response(200, content=b"x" * 101, request=request), 100,
                   deadline=time.monotonic() + 60)
    assert refused.value.too_large
