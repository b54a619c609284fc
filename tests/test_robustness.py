"""Bad input, deadlines, cancellation and a streamed soak against the session's real server.

Every loop is bounded in count and in time; all traffic stays on loopback.
"""

from __future__ import annotations

import asyncio
import random
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probeserve.launcher import RunningServer
from probeserve_client import AsyncProbeClient, ExtractItem, ProbeClient, ProbeServeError
from probeserve_client._proto.probeserve.v1 import probe_service_pb2 as pb

UNFINISHED = "probeserve_engine_unfinished_requests"
IN_FLIGHT = "probeserve_in_flight_items"


def wait_until_idle(server: RunningServer, timeout_s: float = 20) -> dict[str, float]:
    """Poll the metrics until the engine holds no request and nothing is in flight."""
    deadline = time.monotonic() + timeout_s
    metrics = server.metrics()
    while time.monotonic() < deadline:
        metrics = server.metrics()
        if metrics[UNFINISHED] == 0 and metrics[IN_FLIGHT] == 0:
            return metrics
        time.sleep(0.1)
    raise AssertionError(f"server not idle after {timeout_s}s: {metrics[UNFINISHED]=} {metrics[IN_FLIGHT]=}")


FUNCTIONS = st.sampled_from(["get_weather", "book_flight", "", "get_wether", "nope\x00", "é" * 300])
UTTERANCES = st.one_of(
    st.text(max_size=200),
    st.text(alphabet=st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp"]), max_size=50),
    st.just(""),
    st.just("x" * 9000),  # beyond --max-utterance-chars
    st.just("rain " * 700),  # beyond the model's 512 tokens
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(function=FUNCTIONS, utterance=UTTERANCES)
def test_any_input_gets_a_status_and_the_server_keeps_serving(
    client: ProbeClient, function: str, utterance: str
) -> None:
    try:
        result = client.extract(function, utterance, timeout=30)
    except ProbeServeError as error:
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
        assert error.details
    else:
        assert function in ("get_weather", "book_flight") and utterance.strip()
        for slot in result.slots:
            if slot.present:
                assert slot.char_start is not None and slot.char_end is not None
                assert utterance[slot.char_start : slot.char_end] == slot.value
    assert client.health() == "SERVING"


def test_limits_are_named_in_the_message(client: ProbeClient) -> None:
    with pytest.raises(ProbeServeError) as err:
        client.extract("get_weather", "x" * 9000)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "utterance is 9000 characters; the limit is 8192" in err.value.details
    with pytest.raises(ProbeServeError) as err:
        client.extract("get_weather" + "x" * (1 << 20), "rain")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "the limit is 1048576 bytes" in err.value.details


def test_unknown_fields_are_ignored(server: RunningServer) -> None:
    """A newer client may send fields this server does not know; proto3 skips them."""
    known = pb.ExtractRequest(request_id="unknown-fields", function="get_weather", utterance="rain in Oslo")
    unknown_field = bytes([15 << 3 | 0, 1]) + bytes([14 << 3 | 2, 3]) + b"abc"  # varint 15, bytes 14
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_unary(
            "/probeserve.v1.ProbeService/Extract",
            request_serializer=lambda b: b,
            response_deserializer=pb.ExtractResponse.FromString,
        )
        response = call(known.SerializeToString() + unknown_field, timeout=30)
    assert response.request_id == "unknown-fields"
    assert [s.name for s in response.slots] == ["city", "unit"]


def test_request_whose_deadline_cannot_be_met_is_not_started(
    server: RunningServer, client: ProbeClient
) -> None:
    """The server's estimate is a running mean of the engine times it logged, so it is at least
    the smallest of them: a deadline of half that smallest time can never be met and must be
    refused before the engine sees it, whatever this machine's speed."""
    for _ in range(3):  # let the server learn how long an extraction takes
        client.extract("get_weather", "rain in Oslo")
    engine_ms = [float(str(x["engine_ms"])) for x in server.log_lines() if "engine_ms" in x]
    assert len(engine_ms) >= 3
    with pytest.raises(ProbeServeError) as err:
        client.extract("get_weather", "rain in Oslo", request_id="too-tight", timeout=min(engine_ms) / 2e3)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 10
    lines: list[dict[str, object]] = []
    while not lines and time.monotonic() < deadline:
        lines = [x for x in server.log_lines() if x.get("request_id") == "too-tight"]
        time.sleep(0.1)
    assert len(lines) == 1
    assert lines[0]["status"] == "DEADLINE_EXCEEDED"
    assert "was not started" in str(lines[0]["error"])
    wait_until_idle(server)


def test_cancelled_stream_aborts_its_engine_requests(server: RunningServer) -> None:
    """Cancel a stream while the engine holds many of its requests: the engine's count drops."""
    long_utterance = "please book a flight from Paris to Tokyo and back " * 8
    peak = 0.0

    async def run() -> int:
        nonlocal peak
        async with AsyncProbeClient(server.target, timeout=120) as aclient:
            stream = aclient.stream(
                [ExtractItem("book_flight", long_utterance, request_id=f"c{i}") for i in range(64)]
            )
            received = 0
            async for _ in stream:
                received += 1
                peak = max(peak, server.metrics()[UNFINISHED])
                if received == 2:
                    stream.cancel()
            return received

    received = asyncio.run(run())
    assert received == 2
    assert peak > 0, "the engine never held a request of the stream; the test proves nothing"
    cancelled_at = time.monotonic()
    wait_until_idle(server, timeout_s=20)
    aborted = [x for x in server.log_lines() if str(x.get("request_id", "")).startswith("c") and
               x.get("status") == "CANCELLED"]  # fmt: skip
    assert aborted, "no stream item was cancelled"
    assert time.monotonic() - cancelled_at < 20


def test_soak_stream_with_random_cancellations_and_deadlines(server: RunningServer) -> None:
    """Every request of a stream that is not cancelled gets exactly one answer, with its own id."""
    rng = random.Random(1234)
    streams, per_stream, concurrency = 40, 50, 4
    plans = []
    for s in range(streams):
        fate = rng.choice(["complete", "complete", "complete", "cancel", "deadline"])
        plans.append((s, fate, rng.randint(1, per_stream - 1)))
    outcome: dict[str, int] = {"sent": 0, "answered": 0, "cancelled_streams": 0, "deadline_streams": 0}
    started = time.monotonic()

    async def one(aclient: AsyncProbeClient, s: int, fate: str, cut: int) -> None:
        ids = [f"s{s}-{i}" for i in range(per_stream)]
        items = [ExtractItem("get_weather", f"rain {i} in city {s}", request_id=r) for i, r in enumerate(ids)]
        timeout = 0.5 if fate == "deadline" else 120
        stream = aclient.stream(items, timeout=timeout)
        got: list[str] = []
        try:
            async for result in stream:
                # A stream whose deadline is near gets in-band DEADLINE_EXCEEDED for items that
                # could no longer be finished in time: still exactly one answer per item.
                if fate == "deadline" and result.error is not None:
                    assert result.error.code == grpc.StatusCode.DEADLINE_EXCEEDED, result
                else:
                    assert result.ok, result
                got.append(result.request_id)
                if fate == "cancel" and len(got) == cut:
                    stream.cancel()
        except ProbeServeError as error:
            assert fate == "deadline" and error.code == grpc.StatusCode.DEADLINE_EXCEEDED, error
            outcome["deadline_streams"] += 1
        outcome["sent"] += len(ids)
        outcome["answered"] += len(got)
        assert got == ids[: len(got)], "answers out of order, duplicated or with foreign ids"
        if fate == "complete":
            assert got == ids
        elif fate == "cancel":
            assert len(got) == cut
            outcome["cancelled_streams"] += 1

    async def run() -> None:
        async with AsyncProbeClient(server.target, timeout=120) as aclient:
            gate = asyncio.Semaphore(concurrency)

            async def bounded(plan: tuple[int, str, int]) -> None:
                async with gate:
                    await one(aclient, *plan)

            await asyncio.wait_for(asyncio.gather(*(bounded(p) for p in plans)), timeout=600)

    asyncio.run(run())
    print(f"soak: {outcome} in {time.monotonic() - started:.1f}s")
    assert outcome["sent"] == streams * per_stream
    wait_until_idle(server)
    assert ProbeClient(server.target).health() == "SERVING"
