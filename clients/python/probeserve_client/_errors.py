"""The one exception type of the SDK."""

from __future__ import annotations

import grpc


class ProbeServeError(Exception):
    """A call failed; ``code`` is the gRPC status, ``details`` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


def from_rpc_error(error: grpc.RpcError) -> ProbeServeError:
    """Convert a grpc error (sync or aio) into a :class:`ProbeServeError`."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return ProbeServeError(code or grpc.StatusCode.UNKNOWN, details or "")


def status_code(number: int) -> grpc.StatusCode:
    """The :class:`grpc.StatusCode` with this numeric value (UNKNOWN for unknown numbers)."""
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN
