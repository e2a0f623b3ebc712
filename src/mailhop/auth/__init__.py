"""SMTP AUTH users: password hashing (:mod:`.passwords`) and the user store (:mod:`.users`)."""

from __future__ import annotations

from .passwords import DUMMY_HASH, hash_password, needs_rehash, normalize_password, verify_password
from .users import (
    User,
    UserExistsError,
    UserNotFoundError,
    UserStore,
    UserStoreError,
    may_send_as,
    normalize_address,
    normalize_name,
)

__all__ = [
    "DUMMY_HASH",
    "User",
    "UserExistsError",
    "UserNotFoundError",
    "UserStore",
    "UserStoreError",
    "hash_password",
    "may_send_as",
    "needs_rehash",
    "normalize_address",
    "normalize_name",
    "normalize_password",
    "verify_password",
]
