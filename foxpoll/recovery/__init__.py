"""Stalled-order recovery: a queue that re-checks orders until they finish, with dead letters.

Engines: :class:`SQLiteRecoveryQueue` (embedded, one host) and
``ProcrastinateRecoveryQueue`` (PostgreSQL, many workers on many machines; imported on
first use).
"""

from __future__ import annotations

from foxpoll._lazy import lazy_attributes

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


__getattr__ = lazy_attributes(__name__, {"ProcrastinateRecoveryQueue": "procrastinate"})
