"""The shift store's typed errors."""

from __future__ import annotations


class StoreError(Exception):
    """Base class of shift store errors."""


class StoreUnavailableError(StoreError, ConnectionError):
    """The store cannot be reached (server down, timeout, permission denied)."""
