"""Stalled-order recovery: a queue that re-checks orders until they finish, with dead letters.

Engines: :class:`SQLiteRecoveryQueue` (embedded, one host), ``PostgresRecoveryQueue``
(many workers on many machines, pulling like the SQLite queue) and
``ProcrastinateRecoveryQueue`` (the same table, with procrastinate running the workers);
the PostgreSQL engines are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from foxpoll._lazy import lazy_attributes
from foxpoll._watches import WatchQueue, WatchTerms

from .base import (
    JobQueue,
    JobState,
    RecoveryJob,
    RecoveryPolicy,
    RecoveryQueue,
    UnreadableJobs,
)
from .sqlite import SQLiteRecoveryQueue
from .worker import Action, Checked, RecoveryWorker, decide

if TYPE_CHECKING:  # loaded on first use (below); named here for type checkers
    from .postgres import PostgresRecoveryQueue
    from .procrastinate import ProcrastinateRecoveryQueue

__all__ = [
    "Action",
    "Checked",
    "JobQueue",
    "JobState",
    "PostgresRecoveryQueue",
    "ProcrastinateRecoveryQueue",
    "RecoveryJob",
    "RecoveryPolicy",
    "RecoveryQueue",
    "RecoveryWorker",
    "SQLiteRecoveryQueue",
    "UnreadableJobs",
    "WatchQueue",
    "WatchTerms",
    "decide",
]


# Hidden from type checkers: they see the names above, and refuse a misspelt one.
if not TYPE_CHECKING:
    __getattr__ = lazy_attributes(__name__, {"PostgresRecoveryQueue": "postgres",
                                             "ProcrastinateRecoveryQueue": "procrastinate"})
