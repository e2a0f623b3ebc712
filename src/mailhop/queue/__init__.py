"""The durable message queue: a message is acknowledged (250) only once it is on stable storage."""

from .backend import QueueBackend
from .ids import is_queue_id, new_queue_id
from .model import (
    InvalidTransition,
    QueuedMessage,
    RcptStatus,
    RecipientState,
    mark_deferred,
    mark_delivered,
    mark_failed,
)
from .spool import DEFAULT_INLINE_MAX, BodyWriter
from .sqlite import SqliteQueue

__all__ = [
    "DEFAULT_INLINE_MAX",
    "BodyWriter",
    "InvalidTransition",
    "QueueBackend",
    "QueuedMessage",
    "RcptStatus",
    "RecipientState",
    "SqliteQueue",
    "is_queue_id",
    "mark_deferred",
    "mark_delivered",
    "mark_failed",
    "new_queue_id",
]
