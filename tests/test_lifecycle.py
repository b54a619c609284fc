"""Servers of their own: TLS + bearer auth + a small in-flight limit, SIGTERM under load, engine death.

These need a server started with other options (or one the test may break), so each starts
its own real ``probeserve serve`` process next to the session's.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil  # type: ignore[import-untyped]
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from probeserve.launcher import RunningServer, start_server
from probeserve_client import AsyncProbeClient, ExtractItem, ProbeClient, ProbeServeError
from probeserve_client._convert import to_request
from tests.support.tiny_model import TinyArtifacts

TOKEN = "s3cret-token"
LIMIT = 4


@dataclass
class Tls:
    cert: Path
    key: Path

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.cert.read_bytes())


def make_self_signed(directory: Path) -> Tls:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    tls = Tls(directory / "cert.pem", directory / "key.pem")
    tls.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tls.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return tls


# The certificate names "localhost"; the server listens on 127.0.0.1.
TLS_OPTIONS = (("grpc.ssl_target_name_override", "localhost"),)


@pytest.fixture(scope="module")
def guarded(
    tiny: TinyArtifacts, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningServer, Tls]]:
    directory = tmp_path_factory.mktemp("guarded")
    tls = make_self_signed(directory)
    (directory / "tokens").write_text(f"{TOKEN}\n")
    server = start_server(
        bundle=tiny.bundle_dir,
        model=tiny.model_dir,
        precision="fp32",
        log_path=directory / "server.log",
        # The other engine (vLLM's engine-core process), eager, and the unmerged adapter: the
        # session server runs the defaults (the inline engine, compiled, the adapter merged).
        extra_args=(
            "--engine",
            "process",
            "--eager",
            "--lora-mode",
            "adapter",
            "--tls-cert",
            str(tls.cert),
            "--tls-key",
            str(tls.key),
            "--auth-token-file",
            str(directory / "tokens"),
            "--max-in-flight",
            str(LIMIT),
            "--metrics-port",
            "0",
            "--grace",
            "30",
            "--admin",
        ),
        client_kwargs={"credentials": tls.credentials(), "options": TLS_OPTIONS},
        timeout_s=300,
    )
    yield server, tls
    server.stop()


def _client(server: RunningServer, tls: Tls, token: str | None = TOKEN, **kw: object) -> ProbeClient:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    return ProbeClient(
        server.target,
        credentials=tls.credentials(),
        options=TLS_OPTIONS,
        metadata=metadata,
        **kw,  # type: ignore[arg-type]
    )


def test_tls_and_token_are_required_but_health_stays_open(guarded: tuple[RunningServer, Tls]) -> None:
    server, tls = guarded
    with _client(server, tls) as client:
        assert client.extract("get_weather", "rain in Oslo").slots
    with _client(server, tls, token=None) as anonymous:
        assert anonymous.health() == "SERVING"
        for call in (lambda: anonymous.extract("get_weather", "rain"), anonymous.info,
                     lambda: list(anonymous.stream([ExtractItem("get_weather", "rain")]))):  # fmt: skip
            with pytest.raises(ProbeServeError) as err:
                call()
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    with _client(server, tls, token="wrong") as wrong, pytest.raises(ProbeServeError) as err:
        wrong.extract("get_weather", "rain")
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    with ProbeClient(server.target, retries=0, timeout=5) as plaintext, pytest.raises(ProbeServeError) as err:
        plaintext.health()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_admin_calls_need_the_token_and_refused_calls_are_counted(guarded: tuple[RunningServer, Tls]) -> None:
    """AdminService is behind the same token; every refused call shows in the metrics, by method."""
    server, tls = guarded
    before = server.metrics()
    with _client(server, tls, token=None) as anonymous:
        for call in (anonymous.bundles, lambda: anonymous.unload_bundle("tiny"),
                     lambda: anonymous.load_bundle("/etc")):  # fmt: skip
            with pytest.raises(ProbeServeError) as err:
                call()
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(ProbeServeError):
            anonymous.extract("get_weather", "rain")
    with _client(server, tls) as client:
        listed = client.bundles()
    assert [b.name for b in listed.bundles] == ["tiny"] and listed.engine_adapters == ("tiny",)
    after = server.metrics()

    def added(rpc: str) -> float:
        key = f'probeserve_calls_total{{code="UNAUTHENTICATED",rpc="{rpc}"}}'
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert [added(rpc) for rpc in ("ListBundles", "UnloadBundle", "LoadBundle", "Extract")] == [1, 1, 1, 1]


def test_process_engine_with_unmerged_adapter_answers_as_the_default(
    guarded: tuple[RunningServer, Tls], client: ProbeClient
) -> None:
    server, tls = guarded
    cases = [
        ("get_weather", "rain in Oslo tomorrow, celsius"),
        ("book_flight", "Paris to Tokyo on March 3rd"),
    ]
    with _client(server, tls) as other:
        for function, utterance in cases:
            got, want = other.extract(function, utterance), client.extract(function, utterance)
            assert got.values() == want.values()
            for g, w in zip(got.slots, want.slots, strict=True):
                assert (g.present, g.token_start, g.token_end) == (w.present, w.token_start, w.token_end)
                assert g.presence_probability == pytest.approx(w.presence_probability, abs=1e-4)
    log = server.log_lines()
    started = next(e for e in log if e.get("event") == "engine_started")
    assert (started["lora_mode"], started["engine"]) == ("adapter", "process")


def test_overload_gets_resource_exhausted_and_recovers(guarded: tuple[RunningServer, Tls]) -> None:
    server, tls = guarded
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    codes: list[str] = []
    pushback: list[str] = []
    stream_results: list[bool] = []

    async def unary(aclient: AsyncProbeClient, i: int) -> None:
        request = to_request(
            ExtractItem("book_flight", "from Paris to Tokyo on May 3rd " * 4, request_id=f"o{i}")
        )
        call = aclient._stub.Extract(request, timeout=60, metadata=metadata)  # raw: to read trailers
        try:
            await call
            codes.append("OK")
        except grpc.RpcError as error:
            codes.append(error.code().name)
            trailing = dict(await call.trailing_metadata() or ())
            if "grpc-retry-pushback-ms" in trailing:
                pushback.append(str(trailing["grpc-retry-pushback-ms"]))

    async def streamed(aclient: AsyncProbeClient) -> None:
        items = [ExtractItem("get_weather", f"rain {i} in Oslo", request_id=f"st{i}") for i in range(20)]
        async for result in aclient.stream(items):
            stream_results.append(result.ok)

    async def run() -> None:
        async with AsyncProbeClient(
            server.target, credentials=tls.credentials(), options=TLS_OPTIONS, metadata=metadata, retries=0
        ) as aclient:
            await asyncio.wait_for(
                asyncio.gather(streamed(aclient), *(unary(aclient, i) for i in range(40))), timeout=300
            )

    asyncio.run(run())
    rejected = codes.count("RESOURCE_EXHAUSTED")
    print(
        f"overload: limit {LIMIT}, 40 unary + a 20-item stream: {codes.count('OK')} OK, {rejected} rejected"
    )
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}
    assert rejected > 0 and codes.count("OK") > 0
    assert pushback and set(pushback) == {"50"}
    # The stream was held back by flow control, never refused.
    assert stream_results == [True] * 20
    metrics = server.metrics()
    assert metrics["probeserve_in_flight_items"] == 0
    assert metrics['probeserve_calls_total{code="RESOURCE_EXHAUSTED",rpc="Extract"}'] == rejected
    with _client(server, tls) as client:
        assert client.extract("get_weather", "rain in Oslo").slots  # recovered


def test_sigterm_under_load_loses_no_accepted_request(guarded: tuple[RunningServer, Tls]) -> None:
    """Runs last in this module: it stops the guarded server."""
    server, tls = guarded
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    answered: dict[str, str] = {}
    refused: list[str] = []
    signalled = asyncio.Event()

    async def stream_worker(aclient: AsyncProbeClient, w: int) -> None:
        async def items() -> AsyncIterator[ExtractItem]:
            for i in range(200):  # bounded; the server stops long before
                if signalled.is_set():
                    return
                yield ExtractItem("get_weather", f"snow {i} in Bergen", request_id=f"t{w}-{i}")
                await asyncio.sleep(0.01)

        try:
            async for result in aclient.stream(items()):
                assert result.ok, result
                answered[result.request_id] = "OK"
        except ProbeServeError as error:
            refused.append(error.code.name)

    async def run() -> float:
        async with AsyncProbeClient(
            server.target, credentials=tls.credentials(), options=TLS_OPTIONS, metadata=metadata, retries=0
        ) as aclient:
            workers = [asyncio.create_task(stream_worker(aclient, w)) for w in range(3)]
            await asyncio.sleep(2.0)
            sent_at = time.monotonic()
            server.process.terminate()
            await asyncio.sleep(0.3)
            signalled.set()
            await asyncio.wait_for(asyncio.gather(*workers), timeout=120)
            return sent_at

    sent_at = asyncio.run(run())
    code = server.process.wait(60)
    exit_s = time.monotonic() - sent_at
    output = server.log_path.read_text(errors="replace")
    accepted = {  # the items of this test's streams that reached the server
        line["request_id"]: line["status"]
        for line in server.log_lines()
        if line.get("event") == "extract" and str(line.get("request_id")).startswith("t")
    }
    stopped = [line for line in server.log_lines() if line.get("event") == "stopped"]
    print(f"sigterm: {len(accepted)} accepted, {len(answered)} answered, exit {code} after {exit_s:.1f}s, "
          f"drain {stopped[0]['drain_s'] if stopped else '?'}s")  # fmt: skip
    assert code == 0
    assert "Aborted" not in output and "core dumped" not in output
    assert accepted, "no request reached the server before SIGTERM"
    assert all(status == "OK" for status in accepted.values()), accepted
    assert set(accepted) == set(answered), "an accepted request got no answer"
    assert stopped and float(stopped[0]["drain_s"]) < 30


@pytest.fixture(scope="module")
def doomed(tiny: TinyArtifacts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    server = start_server(
        bundle=tiny.bundle_dir, model=tiny.model_dir, precision="fp32",
        log_path=tmp_path_factory.mktemp("doomed") / "server.log", timeout_s=300,
        extra_args=("--engine", "process", "--eager"),  # the engine core is a process to kill
    )  # fmt: skip
    yield server
    server.stop(timeout=30)


def test_engine_death_turns_health_not_serving_and_calls_unavailable(doomed: RunningServer) -> None:
    with ProbeClient(doomed.target, timeout=10, retries=0) as client:
        assert client.extract("get_weather", "rain in Oslo").slots
        children = psutil.Process(doomed.process.pid).children(recursive=True)
        engine_cores = [
            c for c in children if "EngineCore" in " ".join(c.cmdline()) or "EngineCore" in c.name()
        ]
        assert engine_cores, [c.name() for c in children]
        for proc in engine_cores:
            proc.kill()
        deadline = time.monotonic() + 30
        status = client.health()
        while status == "SERVING" and time.monotonic() < deadline:
            time.sleep(0.2)
            status = client.health()
        assert status == "NOT_SERVING"
        started = time.monotonic()
        with pytest.raises(ProbeServeError) as err:
            client.extract("get_weather", "rain in Oslo")
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 5
