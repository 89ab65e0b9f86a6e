"""Errors of the memory store and checkpoints (all under `cellblock.CellblockError`)."""

from cellblock.errors import CellblockError


class MemoryStoreError(CellblockError):
    """The store cannot be opened or used (bad URL, missing driver, database error); the base
    class of the other memory errors."""


class MemoryPathError(MemoryStoreError):
    """A memory path is outside /memories, malformed, read-only, or names nothing."""


class CheckpointNotFound(MemoryStoreError):
    """No checkpoint matches the id (or there is none to resume)."""


class StaleCheckpoint(MemoryStoreError):
    """A newer run of the session holds it: this (older) process may not write checkpoints."""
