"""Scale-out: one client spreads calls over two real server replicas with gRPC's round_robin.

Two real ``probeserve serve`` processes (real vLLM engine, fp32) on loopback ports; one
client whose target lists both addresses (``ipv4:a,b``, the form a DNS name with many records
resolves to) and ``load_balancing="round_robin"``. Each server logs one JSON line per request,
so the logs tell which replica answered which request.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from probeserve.launcher import RunningServer, start_server
from probeserve_client import AsyncProbeClient, ProbeClient
from probeserve_client._convert import channel_options
from tests.support.tiny_model import TinyArtifacts

STARTUP_TIMEOUT_S = 300
CALLS = 40
ASYNC_CALLS = 12
UTTERANCES = ("Will it rain in Lisbon on Saturday?", "snow in Oslo", "weather for Quito tomorrow")


@pytest.fixture(scope="module")
def replicas(tiny: TinyArtifacts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RunningServer]]:
    logs = tmp_path_factory.mktemp("replicas")

    def start(i: int) -> RunningServer:
        return start_server(
            bundle=tiny.bundle_dir,
            model=tiny.model_dir,
            precision="fp32",
            log_path=logs / f"replica{i}.log",
            extra_args=("--eager",),  # a fast start; the session server covers the compiled default
            timeout_s=STARTUP_TIMEOUT_S,
        )

    # Both start at once (each waits for its engine); a failure of one still stops the other.
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(start, i) for i in range(2)]
    errors = [f.exception() for f in futures]
    started = [f.result() for f, error in zip(futures, errors, strict=True) if error is None]
    try:
        for error in errors:
            if error is not None:
                raise error
        yield started
    finally:
        for running in started:
            running.stop()


def _extract_lines(server: RunningServer, prefix: str) -> list[dict[str, object]]:
    return [
        line
        for line in server.log_lines()
        if line.get("event") == "extract" and str(line.get("request_id", "")).startswith(prefix)
    ]


def _served_by(replicas: list[RunningServer], prefix: str, expected: int) -> list[list[dict[str, object]]]:
    """Each replica's log lines for the requests whose id starts with ``prefix``."""
    deadline = time.monotonic() + 10  # lines are flushed one by one; allow a moment
    per_replica = [_extract_lines(r, prefix) for r in replicas]
    while sum(map(len, per_replica)) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
        per_replica = [_extract_lines(r, prefix) for r in replicas]
    return per_replica


def _assert_spread(per_replica: list[list[dict[str, object]]], sent: list[str]) -> None:
    counts = [len(lines) for lines in per_replica]
    print(f"calls per replica: {counts}")
    assert all(n > 0 for n in counts), f"both replicas must serve calls, got {counts}"
    assert all(line["status"] == "OK" for lines in per_replica for line in lines)
    seen = Counter(str(line["request_id"]) for lines in per_replica for line in lines)
    assert set(seen) == set(sent)
    assert all(n == 1 for n in seen.values()), f"served more than once: {seen.most_common(3)}"


def test_channel_options_hold_balancing_retries_keepalive_and_backoff() -> None:
    options = dict(
        channel_options(
            retries=2,
            load_balancing="round_robin",
            keepalive_s=15,
            keepalive_timeout_s=5,
            reconnect_backoff_s=0.5,
            max_reconnect_backoff_s=4,
        )
    )
    config = json.loads(str(options["grpc.service_config"]))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["methodConfig"][0]["retryPolicy"]["maxAttempts"] == 3
    assert options["grpc.keepalive_time_ms"] == 15000
    assert options["grpc.keepalive_timeout_ms"] == 5000
    assert options["grpc.initial_reconnect_backoff_ms"] == 500
    assert options["grpc.max_reconnect_backoff_ms"] == 4000
    # Without retries the service config still carries the policy; without either, none is set.
    assert "methodConfig" not in json.loads(
        str(dict(channel_options(retries=0, load_balancing="pick_first"))["grpc.service_config"])
    )
    assert "grpc.service_config" not in dict(channel_options(retries=0))


def test_round_robin_spreads_calls_over_both_replicas(replicas: list[RunningServer]) -> None:
    target = "ipv4:" + ",".join(r.target for r in replicas)
    prefix = "replicas-sync-"
    sent = [f"{prefix}{i}" for i in range(CALLS)]
    with ProbeClient(
        target,
        timeout=60,
        load_balancing="round_robin",
        reconnect_backoff_s=0.2,
        max_reconnect_backoff_s=2,
    ) as client:
        assert client.health() == "SERVING"
        for i, request_id in enumerate(sent):
            result = client.extract("get_weather", UTTERANCES[i % len(UTTERANCES)], request_id=request_id)
            assert result.request_id == request_id
            assert result.slots, "every answer carries the schema's slots"
    _assert_spread(_served_by(replicas, prefix, CALLS), sent)


def test_async_client_round_robin_over_both_replicas(replicas: list[RunningServer]) -> None:
    target = "ipv4:" + ",".join(r.target for r in replicas)
    prefix = "replicas-async-"
    sent = [f"{prefix}{i}" for i in range(ASYNC_CALLS)]

    async def run() -> list[str]:
        async with AsyncProbeClient(target, timeout=60, load_balancing="round_robin") as client:
            assert await client.health() == "SERVING"
            answers = []
            for wave in range(0, len(sent), 4):  # a few calls in flight at a time
                answers += await asyncio.gather(
                    *(
                        client.extract("get_weather", UTTERANCES[0], request_id=r)
                        for r in sent[wave : wave + 4]
                    )
                )
            return [a.request_id for a in answers]

    assert asyncio.run(run()) == sent
    _assert_spread(_served_by(replicas, prefix, ASYNC_CALLS), sent)
