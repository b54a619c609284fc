"""Error types of the core. The transport maps each kind to one gRPC status code in one place."""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    """What kind of failure; each maps to exactly one gRPC status code."""

    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    FAILED_PRECONDITION = "failed_precondition"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    INTERNAL = "internal"


class ProbeError(Exception):
    """A failure with a kind and a message meant for the caller."""

    kind: ErrorKind = ErrorKind.INTERNAL

    def __init__(self, message: str, kind: ErrorKind | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind

    @property
    def message(self) -> str:
        return str(self)


class InvalidRequestError(ProbeError):
    """The request cannot be answered as asked (unknown function, empty utterance, too long)."""

    kind = ErrorKind.INVALID_ARGUMENT


class EngineUnavailableError(ProbeError):
    """The engine is not ready, or has stopped."""

    kind = ErrorKind.UNAVAILABLE


class BundleError(Exception):
    """A bundle directory is missing files or holds tensors of the wrong shape."""
