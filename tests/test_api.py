"""The gRPC surface through the real client: errors, streams, health, reflection, info."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from probeserve.launcher import RunningServer
from probeserve_client import (
    AsyncProbeClient,
    Extraction,
    ExtractItem,
    ExtractResult,
    ProbeClient,
    ProbeServeError,
)


def test_not_serving_until_engine_is_warm(server: RunningServer) -> None:
    """Health said NOT_SERVING while the engine started, and Extract was refused as UNAVAILABLE."""
    assert server.startup_health[-2:] == ["NOT_SERVING", "SERVING"]
    assert server.early_extract_code == "UNAVAILABLE"


def test_health_is_serving(client: ProbeClient) -> None:
    assert client.health() == "SERVING"
    assert client.health("probeserve.v1.ProbeService") == "SERVING"


def test_reflection_lists_the_service(server: RunningServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "probeserve.v1.ProbeService" in services
    assert "grpc.health.v1.Health" in services


def test_info_describes_model_and_bundle(client: ProbeClient) -> None:
    info = client.info()
    assert info.precision == "fp32"
    assert info.engine_version.startswith("vllm ")
    assert info.max_prompt_tokens == 512
    (bundle,) = info.bundles
    assert bundle.name == "tiny" and bundle.hidden_size == 128
    assert [f.name for f in bundle.functions] == ["book_flight", "get_weather"]
    assert [s.name for s in bundle.functions[1].slots] == ["city", "unit"]


def test_request_id_is_echoed_or_assigned(client: ProbeClient) -> None:
    assert client.extract("get_weather", "rain in Oslo", request_id="abc-1").request_id == "abc-1"
    assert len(client.extract("get_weather", "rain in Oslo").request_id) == 32


@pytest.mark.parametrize(
    ("function", "utterance", "message"),
    [
        ("no_such_function", "rain in Oslo", "unknown function 'no_such_function'"),
        ("get_wether", "rain in Oslo", "did you mean 'get_weather'?"),
        ("", "rain in Oslo", "function is required"),
        ("get_weather", "", "utterance is empty"),
        ("get_weather", " \n\t ", "utterance is empty"),
        ("get_weather", "rain " * 600, "the model accepts at most 512"),
    ],
)
def test_bad_requests_get_invalid_argument(
    client: ProbeClient, function: str, utterance: str, message: str
) -> None:
    with pytest.raises(ProbeServeError) as err:
        client.extract(function, utterance)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details


def test_unknown_bundle_is_not_found(client: ProbeClient) -> None:
    with pytest.raises(ProbeServeError) as err:
        client.extract("get_weather", "rain in Oslo", bundle="other")
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert "'other' is not loaded" in err.value.details


def test_stream_keeps_order_and_reports_bad_items_in_band(client: ProbeClient) -> None:
    items = []
    for i in range(40):
        bad = i % 7 == 3
        items.append(
            ExtractItem("nope" if bad else "get_weather", f"weather {i} in Lima", request_id=f"r{i}")
        )
    results = list(client.stream(items))
    assert [r.request_id for r in results] == [f"r{i}" for i in range(40)]
    for i, result in enumerate(results):
        if i % 7 == 3:
            assert result.error is not None and result.error.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "unknown function 'nope'" in result.error.message
        else:
            assert result.ok and result.extraction is not None
            assert [s.name for s in result.extraction.slots] == ["city", "unit"]


def test_items_without_ids_get_one_whether_they_succeed_or_fail(client: ProbeClient) -> None:
    """A failed batch or stream item carries the id the server assigned it, as a good one does."""
    items = [("get_weather", "sun in Rome"), ("nope", "sun in Rome"), ("get_weather", "")]
    streamed = list(client.stream(items))
    batched = client.extract_batch(items)
    for results in (streamed, batched):
        assert [r.ok for r in results] == [True, False, False]
        ids = [r.request_id for r in results]
        assert all(len(i) == 32 for i in ids) and len(set(ids)) == 3
        assert results[0].extraction is not None and results[0].extraction.request_id == ids[0]


def test_batch_reports_bad_items_in_band(client: ProbeClient) -> None:
    results = client.extract_batch(
        [("get_weather", "sun in Rome"), ("get_weather", ""), ("book_flight", "to Rome")]
    )
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].error is not None and results[1].error.code == grpc.StatusCode.INVALID_ARGUMENT


def test_oversized_batch_is_refused(client: ProbeClient) -> None:
    with pytest.raises(ProbeServeError) as err:
        client.extract_batch([("get_weather", "sun")] * 257)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "the limit is 256" in err.value.details


def test_stream_can_be_cancelled_midway(client: ProbeClient) -> None:
    def endless() -> object:
        for i in range(10_000):  # bounded: the client cancels long before the end
            yield ExtractItem("get_weather", f"rain {i} in Oslo", request_id=str(i))

    stream = client.stream(endless(), timeout=120)  # type: ignore[arg-type]
    got = []
    started = time.monotonic()
    for result in stream:
        got.append(result.request_id)
        if len(got) == 5:
            stream.cancel()
    assert got[:5] == ["0", "1", "2", "3", "4"]
    assert time.monotonic() - started < 60
    assert client.health() == "SERVING"


def test_async_client_matches_sync(server: RunningServer, client: ProbeClient) -> None:
    sync = client.extract("book_flight", "from Lisbon to Madrid on Monday")

    async def run() -> tuple[Extraction, list[ExtractResult], list[ExtractResult]]:
        async with AsyncProbeClient(server.target, timeout=60) as aclient:
            one = await aclient.extract("book_flight", "from Lisbon to Madrid on Monday")
            batch = await aclient.extract_batch([("book_flight", "from Lisbon to Madrid on Monday")])

            async def items() -> AsyncIterator[ExtractItem]:
                for i in range(3):
                    yield ExtractItem("book_flight", "from Lisbon to Madrid on Monday", request_id=str(i))

            streamed = [r async for r in aclient.stream(items())]
            return one, batch, streamed

    one, batch, streamed = asyncio.run(run())
    assert one.values() == sync.values()
    assert batch[0].extraction.values() == sync.values()  # type: ignore[union-attr]
    assert [r.request_id for r in streamed] == ["0", "1", "2"]


def test_server_logs_one_json_line_per_request_without_text(
    server: RunningServer, client: ProbeClient
) -> None:
    client.extract("get_weather", "secret words in Quito", request_id="log-check-1")
    deadline = time.monotonic() + 10
    lines: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        lines = [line for line in server.log_lines() if line.get("request_id") == "log-check-1"]
        if lines:
            break
        time.sleep(0.2)
    assert len(lines) == 1
    (line,) = lines
    assert line["event"] == "extract" and line["status"] == "OK"
    assert line["utterance_chars"] == len("secret words in Quito")
    assert {"queue_ms", "prepare_ms", "engine_ms", "heads_ms", "total_ms", "prompt_tokens"} <= set(line)
    assert "secret" not in server.log_path.read_text()


def test_server_started_without_tuning_flags_runs_the_defaults(server: RunningServer) -> None:
    """The session server is started with no engine flags: it must run what BENCHMARKS.md measured
    fastest, the inline engine compiled, with the adapter merged at full precision."""
    started = next(e for e in server.log_lines() if e.get("event") == "engine_started")
    assert (started["engine"], started["compiled"], started["lora_mode"]) == ("inline", True, "merged")
    assert (started["max_loras"], started["specialize_active_lora"]) == (0, False)  # no LoRA in the engine
