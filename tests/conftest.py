"""Shared fixtures: a tiny model and bundle made on the spot, and ONE real server per test session.

The server is the real ``probeserve serve`` process (real vLLM engine, real gRPC on loopback);
tests talk to it through the real client. It runs at fp32 so that its answers can be compared
exactly with the transformers+peft reference.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from probeserve.core.bundle import Bundle, load_bundle
from probeserve.launcher import RunningServer, start_server
from probeserve_client import ProbeClient
from tests.support.tiny_model import TinyArtifacts, make_all, make_layout_bundle

STARTUP_TIMEOUT_S = 300


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Merged checkpoints go to a directory of this session's, not the user's cache."""
    saved = os.environ.get("PROBESERVE_CACHE")
    os.environ["PROBESERVE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if saved is None:
        os.environ.pop("PROBESERVE_CACHE", None)
    else:
        os.environ["PROBESERVE_CACHE"] = saved


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyArtifacts:
    """The tiny model and its bundle, packed (pairing fingerprints and calibration references)."""
    return make_all(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_bundle(tiny: TinyArtifacts) -> Bundle:
    return load_bundle(tiny.bundle_dir)


@pytest.fixture(scope="session")
def server(tiny: TinyArtifacts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(
        bundle=tiny.bundle_dir,
        model=tiny.model_dir,
        precision="fp32",
        log_path=tmp_path_factory.mktemp("server") / "server.log",
        probe_function="get_weather",
        extra_args=("--metrics-port", "0"),
        timeout_s=STARTUP_TIMEOUT_S,
    )
    yield running
    running.stop()


@pytest.fixture(scope="session")
def word_punct_bundle_dir(tiny: TinyArtifacts, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second task's bundle on the tiny model: its own adapter and heads, the ``word_punct``
    utterance layout, packed."""
    root = tmp_path_factory.mktemp("tiny-word-punct")
    return make_layout_bundle(tiny, root, "word_punct", name=WORD_PUNCT_BUNDLE, seed=1)


# The names the bundles server serves its two bundles under (its default first).
WORD_PUNCT_BUNDLE = "tiny-wp"
NATURAL_BUNDLE = "tiny"


@pytest.fixture(scope="session")
def word_punct_server(
    tiny: TinyArtifacts, word_punct_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """A second real server with two bundles on the tiny model (the word_punct one, its default,
    and the session server's natural one, adapters per request) and AdminService on loopback."""
    running = start_server(
        bundle=word_punct_bundle_dir,
        model=tiny.model_dir,
        precision="fp32",
        log_path=tmp_path_factory.mktemp("server-word-punct") / "server.log",
        probe_function="get_weather",
        # --eager: a fast start; the session server covers the compiled default.
        extra_args=("--bundle", str(tiny.bundle_dir), "--admin", "--eager", "--metrics-port", "0"),
        timeout_s=STARTUP_TIMEOUT_S,
    )
    yield running
    running.stop()


@pytest.fixture
def client(server: RunningServer) -> Iterator[ProbeClient]:
    with ProbeClient(server.target, timeout=60) as c:
        yield c
