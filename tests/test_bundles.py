"""Several bundles on one model: chosen per request, loaded and unloaded while serving.

All on the real server with two bundles (tests/conftest.py's ``word_punct_server``: two tasks
with their own adapters, heads and layouts on the tiny model, adapters per request, AdminService
on loopback), through the real client, against the transformers+peft reference of each bundle.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc
import pytest

from probeserve.core.bundle import load_bundle
from probeserve.launcher import RunningServer
from probeserve.pairing.reference import ReferenceModel, ReferenceSlot
from probeserve_client import Extraction, ExtractItem, ExtractResult, ProbeClient, ProbeServeError, Slot
from tests.conftest import NATURAL_BUNDLE, WORD_PUNCT_BUNDLE
from tests.support.tiny_model import TinyArtifacts, make_layout_bundle, make_model, make_tokenizer

CASES = [
    ("book_flight", "Book a flight from Paris to Tokyo on March 3rd for two adults."),
    ("get_weather", "What's the weather in Berlin tomorrow, in celsius please?"),
    ("get_weather", "What you know is reverse of the string 'Hello, World!'?"),
    ("book_flight", "Calculate the median of the numbers [3, 5, 7, 9, 11]."),
    ("book_flight", "I need to get from Oslo to Rome, 2 people, next Friday"),
    ("get_weather", "temperature fahrenheit Chicago"),
]
WAIT_S = 120  # every background call is bounded by this


Slots = Sequence[ReferenceSlot] | Sequence[Slot]


def _decisions(slots: Slots) -> list[tuple[object, ...]]:
    """What a bundle decided for each slot: presence and, where present, the span's tokens."""
    return [(s.name, s.present, s.token_start if s.present else None, s.token_end if s.present else None)
            for s in slots]  # fmt: skip


def _same(got: Extraction, want: Sequence[ReferenceSlot]) -> bool:
    """The served answer is the reference's: equal decisions, probabilities within 1e-4."""
    return _decisions(got.slots) == _decisions(want) and all(
        abs(g.presence_probability - w.presence_probability) <= 1e-4
        for g, w in zip(got.slots, want, strict=True)
    )


class References:
    """Each bundle's reference answers, computed once per (bundle, case)."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self._models: dict[Path, ReferenceModel] = {}
        self._answers: dict[tuple[Path, str, str], list[ReferenceSlot]] = {}

    def answer(self, bundle_dir: Path, function: str, utterance: str) -> list[ReferenceSlot]:
        key = (bundle_dir, function, utterance)
        if key not in self._answers:
            if bundle_dir not in self._models:
                self._models[bundle_dir] = ReferenceModel(self.model_dir, load_bundle(bundle_dir))
            self._answers[key] = self._models[bundle_dir].extract(function, utterance)
        return self._answers[key]


@pytest.fixture(scope="module")
def references(tiny: TinyArtifacts) -> References:
    return References(tiny.model_dir)


@pytest.fixture(scope="module")
def bundle_dirs(tiny: TinyArtifacts, word_punct_bundle_dir: Path) -> dict[str, Path]:
    return {NATURAL_BUNDLE: tiny.bundle_dir, WORD_PUNCT_BUNDLE: word_punct_bundle_dir}


@pytest.fixture(scope="module")
def third_bundles(tiny: TinyArtifacts, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two more tasks on the tiny model (natural layout), to load while serving: v1 and v2."""
    v1 = make_layout_bundle(tiny, tmp_path_factory.mktemp("third-v1"), None, name="third", seed=2)
    v2 = make_layout_bundle(
        tiny, tmp_path_factory.mktemp("third-v2"), None, name="third", seed=3, version="2"
    )
    return v1, v2


@pytest.fixture
def client(word_punct_server: RunningServer) -> Iterator[ProbeClient]:
    with ProbeClient(word_punct_server.target, timeout=WAIT_S) as c:
        yield c


def test_get_info_lists_both_bundles(client: ProbeClient, bundle_dirs: dict[str, Path]) -> None:
    info = client.info()
    assert [b.name for b in info.bundles] == [WORD_PUNCT_BUNDLE, NATURAL_BUNDLE]  # the default first
    assert [b.is_default for b in info.bundles] == [True, False]
    for served in info.bundles:
        bundle = load_bundle(bundle_dirs[served.name])
        assert served.utterance_segmentation == bundle.utterance_segmentation
        assert (served.adapter_sha256, served.heads_sha256) == (bundle.adapter_sha256, bundle.heads_sha256)
        assert served.base_model_fingerprint == bundle.base_model_fingerprint != ""
        assert {f.name for f in served.functions} == set(bundle.functions)
    assert info.bundles[0].adapter_sha256 != info.bundles[1].adapter_sha256


def test_a_stream_alternating_bundles_answers_each_item_with_its_own_bundle(
    client: ProbeClient, references: References, bundle_dirs: dict[str, Path]
) -> None:
    """Items of one stream alternate between the two bundles; each equals its own bundle's
    reference, and batch and unary agree item by item."""
    names = [NATURAL_BUNDLE, WORD_PUNCT_BUNDLE]
    items = [
        ExtractItem(f, u, request_id=f"alt-{i}", bundle=names[i % 2])
        for i, (f, u) in enumerate(CASES + CASES[::-1])
    ]
    streamed = list(client.stream(items))
    batch = client.extract_batch(items)
    assert [r.request_id for r in streamed] == [r.request_id for r in batch] == [i.request_id for i in items]
    differs = 0
    for item, s, b in zip(items, streamed, batch, strict=True):
        assert s.extraction is not None and b.extraction is not None, (s.error, b.error)
        want = references.answer(bundle_dirs[item.bundle], item.function, item.utterance)
        other = references.answer(
            bundle_dirs[names[names.index(item.bundle) - 1]], item.function, item.utterance
        )
        unary = client.extract(item.function, item.utterance, bundle=item.bundle)
        for got in (s.extraction, b.extraction, unary):
            assert _same(got, want), (item, got, want)
        differs += _decisions(want) != _decisions(other)
    # Only evidence if the two bundles answer differently on these utterances.
    assert differs >= len(items) // 2


def test_an_empty_bundle_field_gets_the_default(client: ProbeClient, references: References,
                                                 bundle_dirs: dict[str, Path]) -> None:  # fmt: skip
    function, utterance = CASES[0]
    want = references.answer(bundle_dirs[WORD_PUNCT_BUNDLE], function, utterance)
    assert _same(client.extract(function, utterance), want)


def test_an_unknown_bundle_gets_not_found_naming_the_loaded_ones(client: ProbeClient) -> None:
    with pytest.raises(ProbeServeError) as err:
        client.extract("get_weather", "rain in Oslo", bundle="nope")
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert "'nope'" in err.value.details and f"'{NATURAL_BUNDLE}'" in err.value.details
    (result,) = list(client.stream([ExtractItem("get_weather", "rain", "s-1", bundle="nope")]))
    assert result.error is not None and result.error.code == grpc.StatusCode.NOT_FOUND
    assert result.request_id == "s-1"


class _Streamer(threading.Thread):
    """One stream of items, fed by a bounded generator; records every result."""

    def __init__(self, client: ProbeClient, items: Iterator[ExtractItem]) -> None:
        super().__init__(daemon=True)
        self.client, self.items = client, items
        self.sent: list[str] = []
        self.results: list[ExtractResult] = []
        self.error: BaseException | None = None

    def _feed(self) -> Iterator[ExtractItem]:
        for item in self.items:
            self.sent.append(item.request_id)
            yield item

    def run(self) -> None:
        try:
            for result in self.client.stream(self._feed(), timeout=WAIT_S):
                self.results.append(result)
        except BaseException as exc:  # reported by the test
            self.error = exc


def _paced(
    prefix: str,
    bundle: str,
    count: int,
    gap_s: float,
    stop: threading.Event,
    cases: list[tuple[str, str]] = CASES,
) -> Iterator[ExtractItem]:
    """Up to ``count`` items ``gap_s`` apart, fewer if ``stop`` is set (bounded either way)."""
    for i in range(count):
        if stop.is_set():
            return
        function, utterance = cases[i % len(cases)]
        yield ExtractItem(function, utterance, f"{prefix}-{i}", bundle=bundle)
        time.sleep(gap_s)


def test_a_third_bundle_is_loaded_used_and_unloaded_under_load(
    word_punct_server: RunningServer, client: ProbeClient, references: References,
    bundle_dirs: dict[str, Path], third_bundles: tuple[Path, Path],
) -> None:  # fmt: skip
    third, _ = third_bundles
    stop, stop_third = threading.Event(), threading.Event()
    load = [
        _Streamer(client, _paced(f"bg{k}", (NATURAL_BUNDLE, WORD_PUNCT_BUNDLE)[k], 400, 0.02, stop))
        for k in range(2)
    ]
    for streamer in load:
        streamer.start()
    try:
        loaded = client.load_bundle(str(third))
        assert loaded.bundle.name == "third" and not loaded.bundle.is_default
        assert loaded.replaced_version is None
        listed = client.bundles()
        assert "third" in [b.name for b in listed.bundles] and "third" in listed.engine_adapters
        function, utterance = CASES[1]
        assert _same(
            client.extract(function, utterance, bundle="third"), references.answer(third, function, utterance)
        )
        user = _Streamer(client, _paced("third", "third", 400, 0.02, stop_third))
        user.start()
        deadline = time.monotonic() + WAIT_S
        while len(user.results) < 5 and time.monotonic() < deadline and user.is_alive():
            time.sleep(0.05)
        unloaded = client.unload_bundle("third")
        assert unloaded.bundle.name == "third" and unloaded.drained_requests >= 0
        time.sleep(0.3)  # a few more items reach the server after the unload
    finally:
        stop_third.set()
        stop.set()
    for streamer in (*load, user):
        streamer.join(WAIT_S)
        assert not streamer.is_alive() and streamer.error is None, streamer.error
        # Every item sent was answered exactly once, in order.
        assert [r.request_id for r in streamer.results] == streamer.sent
    for streamer in load:
        assert all(r.ok for r in streamer.results), [r.error for r in streamer.results if not r.ok][:3]
    codes = [r.error.code if r.error else grpc.StatusCode.OK for r in user.results]
    first_refused = codes.index(grpc.StatusCode.NOT_FOUND)
    assert first_refused >= 5 and set(codes[:first_refused]) == {grpc.StatusCode.OK}
    assert set(codes[first_refused:]) == {grpc.StatusCode.NOT_FOUND}, codes
    for item_id, result in zip(user.sent, user.results, strict=True):
        if result.extraction is not None:
            function, utterance = CASES[int(item_id.rsplit("-", 1)[1]) % len(CASES)]
            assert _same(result.extraction, references.answer(third, function, utterance))
    with pytest.raises(ProbeServeError) as err:
        client.extract("get_weather", "rain in Oslo", bundle="third")
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    after = client.bundles()
    assert "third" not in [b.name for b in after.bundles]
    assert sorted(after.engine_adapters) == sorted([NATURAL_BUNDLE, WORD_PUNCT_BUNDLE])
    metrics = word_punct_server.metrics()
    assert metrics['probeserve_items_total{bundle="third",code="OK",rpc="ExtractStream"}'] >= 5
    assert metrics['probeserve_items_total{bundle="",code="NOT_FOUND",rpc="ExtractStream"}'] >= 1
    assert metrics['probeserve_items_total{bundle="tiny",code="OK",rpc="ExtractStream"}'] >= 1


def test_replacing_a_bundle_is_atomic_for_callers(
    client: ProbeClient, references: References, third_bundles: tuple[Path, Path]
) -> None:
    """A stream of one bundle's items while a second version replaces it: every item is
    answered by one version, v1 or v2, never an error; after the swap, only v2."""
    v1, v2 = third_bundles
    function, utterance = CASES[0]
    want = {"1": references.answer(v1, function, utterance), "2": references.answer(v2, function, utterance)}
    assert _decisions(want["1"]) != _decisions(want["2"])
    client.load_bundle(str(v1), name="canary")
    stop = threading.Event()
    user = _Streamer(client, _paced("c", "canary", 400, 0.02, stop, cases=[(function, utterance)]))
    user.start()
    try:
        with pytest.raises(ProbeServeError) as taken:
            client.load_bundle(str(v2), name="canary")  # without replace
        assert taken.value.code == grpc.StatusCode.ALREADY_EXISTS
        time.sleep(0.3)
        swapped = client.load_bundle(str(v2), name="canary", replace=True)
        assert swapped.replaced_version == "1" and swapped.bundle.version == "2"
        time.sleep(0.5)
    finally:
        stop.set()
        user.join(WAIT_S)
    assert user.error is None and [r.request_id for r in user.results] == user.sent
    versions = []
    for result in user.results:
        assert result.extraction is not None, result.error
        matches = [v for v, slots in want.items() if _same(result.extraction, slots)]
        assert len(matches) == 1, result
        versions.append(matches[0])
    assert versions[0] == "1" and versions[-1] == "2"
    assert "1" not in versions[versions.index("2") :], versions  # one swap, never back
    assert client.unload_bundle("canary").bundle.version == "2"


def test_a_bundle_for_another_model_is_refused_and_the_others_serve_on(
    client: ProbeClient, tiny: TinyArtifacts, tmp_path_factory: pytest.TempPathFactory
) -> None:
    root = tmp_path_factory.mktemp("other-model")
    other_model = root / "model"
    other_model.mkdir()
    make_tokenizer(other_model)
    make_model(other_model, seed=5)
    foreign = make_layout_bundle(tiny, root, None, name="foreign", seed=4, model_dir=other_model)
    with pytest.raises(ProbeServeError) as err:
        client.load_bundle(str(foreign))
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "pairing check" in err.value.details
    assert "foreign" not in [b.name for b in client.bundles().bundles]
    assert "foreign" not in client.bundles().engine_adapters
    assert client.extract("get_weather", "rain in Oslo", bundle=NATURAL_BUNDLE).slots
    assert client.health() == "SERVING"


def test_admin_refusals_are_precise(client: ProbeClient, tmp_path: Path) -> None:
    cases: list[tuple[Callable[[], object], grpc.StatusCode, str]] = [
        (lambda: client.unload_bundle(WORD_PUNCT_BUNDLE), grpc.StatusCode.FAILED_PRECONDITION, "default"),
        (lambda: client.unload_bundle("nope"), grpc.StatusCode.NOT_FOUND, "'nope'"),
        (lambda: client.load_bundle(str(tmp_path / "missing")), grpc.StatusCode.INVALID_ARGUMENT, "missing"),
        (lambda: client.load_bundle(""), grpc.StatusCode.INVALID_ARGUMENT, "path"),
    ]
    for call, code, words in cases:
        with pytest.raises(ProbeServeError) as err:
            call()
        assert err.value.code == code and words in err.value.details, err.value.details


def test_admin_service_is_absent_without_the_flag(server: RunningServer) -> None:
    with ProbeClient(server.target, timeout=30) as plain, pytest.raises(ProbeServeError) as err:
        plain.bundles()
    assert err.value.code == grpc.StatusCode.UNIMPLEMENTED


def test_the_engine_log_says_how_many_adapters_a_step_may_mix(word_punct_server: RunningServer) -> None:
    """Two bundles with --admin: adapters per request, slots for at least four (ADMIN_MIN_LORAS);
    no graphs to specialize on a CPU (engines.config.specialize_by_default)."""
    started = next(e for e in word_punct_server.log_lines() if e.get("event") == "engine_started")
    logged = (started["lora_mode"], started["max_loras"], started["specialize_active_lora"])
    assert logged == ("adapter", 4, False)
