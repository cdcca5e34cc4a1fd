"""Stalled-order recovery: a queue that re-checks orders until they finish, with dead letters.

Engines: :class:`SQLiteRecoveryQueue` (embedded, one host) and
``ProcrastinateRecoveryQueue`` (PostgreSQL, many workers on many machines; imported on
first use).
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import JobQueue, JobState, RecoveryJob, RecoveryQueue
from .sqlite import SQLiteRecoveryQueue
from .worker import Action, Checked, RecoveryPolicy, RecoveryWorker, decide

__all__ = [
    "Action",
    "Checked",
    "JobQueue",
    "JobState",
    "ProcrastinateRecoveryQueue",
    "RecoveryJob",
    "RecoveryPolicy",
    "RecoveryQueue",
    "RecoveryWorker",
    "SQLiteRecoveryQueue",
    "decide",
]


def __getattr__(name: str) -> Any:
    if name == "ProcrastinateRecoveryQueue":
        return importlib.import_module(".procrastinate", __name__).ProcrastinateRecoveryQueue
    raise AttributeError(f"module 'foxpoll.recovery' has no attribute {name!r}")
