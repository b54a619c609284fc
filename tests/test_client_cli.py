"""``probeserve-client``'s connection options: accepted before or after the command, no server needed."""

from __future__ import annotations

import pytest

from probeserve_client._connection import client_kwargs
from probeserve_client.cli import _parser


def test_connection_options_go_before_or_after_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROBESERVE_AUTH_TOKEN", raising=False)
    before = _parser().parse_args(["--target", "h:1", "--timeout", "5", "info"])
    after = _parser().parse_args(["info", "--target", "h:1", "--timeout", "5"])
    both = _parser().parse_args(["--target", "x:9", "loadtest", "--target", "h:1", "--timeout", "5"])
    for args in (before, after, both):
        assert (args.target, args.timeout, args.auth_token) == ("h:1", 5.0, None)
        assert client_kwargs(args) == {"timeout": 5.0}
    default = _parser().parse_args(["health"])
    assert (default.target, default.timeout) == ("localhost:50051", 30.0)


def test_token_and_tls_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROBESERVE_AUTH_TOKEN", "from-env")
    args = _parser().parse_args(["extract", "f", "u"])
    assert client_kwargs(args)["metadata"] == (("authorization", "Bearer from-env"),)
    args = _parser().parse_args(["extract", "f", "u", "--auth-token", "given", "--tls"])
    kwargs = client_kwargs(args)
    assert kwargs["metadata"] == (("authorization", "Bearer given"),) and "credentials" in kwargs
    with pytest.raises(ValueError, match="go together"):
        client_kwargs(_parser().parse_args(["info", "--tls-cert", "c.pem"]))
    with pytest.raises(ValueError, match="needs TLS"):
        client_kwargs(_parser().parse_args(["info", "--tls-server-name", "probeserve"]))
