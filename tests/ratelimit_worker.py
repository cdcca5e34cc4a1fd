"""A process spending a shared request budget, for the fleet tests of foxpoll.ratelimit.

Usage: python ratelimit_worker.py CONFIG_JSON
It reads one order again and again for ``duration`` seconds, every request taking a permit
from a SQLiteRateLimit or RedisRateLimit shared with the other processes.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from foxpoll import FoxReload
from foxpoll.ratelimit import RedisRateLimit, SQLiteRateLimit


def main(config: dict[str, Any]) -> None:
    limit: SQLiteRateLimit | RedisRateLimit
    if config["backend"] == "sqlite":
        limit = SQLiteRateLimit(config["target"], config["per_minute"], burst=config["burst"],
                                key=config["key"])
    else:
        limit = RedisRateLimit(config["target"], config["per_minute"], burst=config["burst"],
                               key_prefix=f"{config['key']}:")
    with FoxReload(config["api_key"], base_url=config["sim_url"], rate_limit=limit,
                   max_retries=0) as client:
        deadline = time.monotonic() + config["duration"]
        while time.monotonic() < deadline:
            try:
                client.orders.get(config["order_id"])
            except Exception as exc:  # a 429 of the test's own fault: keep spending
                print(type(exc).__name__, flush=True)
    limit.close()


if __name__ == "__main__":
    with open(sys.argv[1]) as file:
        main(json.load(file))
