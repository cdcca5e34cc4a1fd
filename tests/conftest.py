from __future__ import annotations

import logging
import os
import random
import threading
from collections.abc import Iterator

import pytest

from foxpoll.testing import FakeClock, FakeFoxReload

API_KEY = "sk-live-7f3a9c1e5b2d4a6f"  # looks real, so a leak would show in assertions


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sim(clock: FakeClock) -> FakeFoxReload:
    return FakeFoxReload(api_key=API_KEY, clock=clock)


@pytest.fixture
def rng() -> random.Random:
    return random.Random(1234)


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    """moto in server mode on a free port: DynamoDB and SQS over real HTTP.

    It answers one request at a time. DynamoDB applies each conditional write atomically;
    moto's threaded server does not (two concurrent UpdateItems can both pass a condition,
    or one can read the other's half-written item). Serving requests one by one gives moto
    the atomicity of the real service, while the clients under test still send
    concurrently.
    """
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    from .services import AWS_ENV

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = make_server("127.0.0.1", 0, DomainDispatcherApplication(create_backend_app),
                         threaded=False)
    serving = threading.Thread(target=server.serve_forever, name="moto", daemon=True)
    serving.start()
    previous = {k: os.environ.get(k) for k in AWS_ENV}
    os.environ.update(AWS_ENV)
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        serving.join()
        server.server_close()
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
