"""What a call costs after the machine sat idle: the part of gRPC latency no server code removes.

At concurrency 1 a client waits while the server works (~10 ms on a GPU), and the server's
transport threads wait while the engine works. Each thread that slept must be woken, and a
host may wake a thread that slept for milliseconds more slowly than one that slept for
microseconds. This measures that on the host at hand, with nothing of probeserve's in the way:

- **socket**: a byte bounced between two processes over a socketpair;
- **grpc**: a unary call with an empty handler (grpc.aio server, sync client, loopback, another
  process), the transport probeserve uses;
- **grpc + worker wait**: the handler hands the call to a worker thread that sleeps ``--wait-ms``
  (an engine step) and wakes the event loop, as the inline engine does.

Each runs back to back and with ``--gaps-ms`` pauses before each call (the pause not counted).
Prints one JSON object; medians in microseconds.

    python scripts/bench/wake_latency.py                      # ~20 s
    python scripts/bench/wake_latency.py --n 300 --gaps-ms 0,1,3,10 --wait-ms 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import queue
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from common import host_cpu

METHOD = "/wake.Echo/Call"


def median_us(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e6, 1)


def pause(gap_s: float) -> None:
    if gap_s:
        time.sleep(gap_s)


def timed(call: Callable[[], object], n: int, gap_s: float) -> float:
    samples = []
    for _ in range(n):
        pause(gap_s)
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    return median_us(samples)


def socket_pingpong(n: int, gaps: list[float]) -> dict[str, float]:
    here, there = socket.socketpair()
    child = subprocess.Popen(
        [sys.executable, __file__, "--echo-fd", str(there.fileno())], pass_fds=(there.fileno(),)
    )
    there.close()

    def bounce() -> None:
        here.sendall(b"x")
        here.recv(1)

    out = {f"gap_{g * 1e3:g}ms": timed(bounce, n, g) for g in gaps}
    here.close()
    child.wait(timeout=10)
    return out


def echo_fd(fd: int) -> None:
    with socket.socket(fileno=fd) as s:
        while data := s.recv(1):
            s.sendall(data)


def grpc_server_child(wait_s: float, port_file: Path) -> None:
    """An asyncio gRPC server whose one method answers at once, or after a worker thread slept."""
    import grpc

    jobs: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()

    def worker() -> None:
        while True:
            done = jobs.get()
            time.sleep(wait_s)
            done()

    threading.Thread(target=worker, daemon=True).start()

    async def call(request: bytes, context: object) -> bytes:
        if wait_s:
            loop = asyncio.get_running_loop()
            answered: asyncio.Future[None] = loop.create_future()
            jobs.put(lambda: loop.call_soon_threadsafe(answered.set_result, None))
            await answered
        return request

    async def main() -> None:
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(call)
        echo = grpc.method_handlers_generic_handler("wake.Echo", {"Call": handler})
        server.add_generic_rpc_handlers((echo,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        port_file.write_text(str(port))
        await server.wait_for_termination()

    asyncio.run(main())


def grpc_calls(n: int, gaps: list[float], wait_s: float) -> dict[str, float]:
    import grpc

    port_file = Path(f"/tmp/wake_latency_{os.getpid()}_{wait_s}.port")
    port_file.unlink(missing_ok=True)
    child = subprocess.Popen([sys.executable, __file__, "--grpc-server", str(wait_s), str(port_file)])
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        with grpc.insecure_channel(f"127.0.0.1:{port_file.read_text()}") as channel:
            call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
            payload = b"x" * 200  # about an ExtractRequest

            def once() -> None:
                call(payload, timeout=10)

            for _ in range(50):
                once()
            return {f"gap_{g * 1e3:g}ms": timed(once, n, g) for g in gaps}
    finally:
        child.kill()
        child.wait(timeout=10)
        port_file.unlink(missing_ok=True)


def grpc_version() -> str:
    import grpc

    return str(grpc.__version__)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="calls per figure")
    parser.add_argument("--gaps-ms", default="0,3,10", help="pauses before each call, comma-separated")
    parser.add_argument("--wait-ms", type=float, default=8.0, help="the worker's sleep (an engine step)")
    parser.add_argument("--echo-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--grpc-server", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_fd is not None:
        echo_fd(args.echo_fd)
        return 0
    if args.grpc_server:
        grpc_server_child(float(args.grpc_server[0]), Path(args.grpc_server[1]))
        return 0
    gaps = [float(g) / 1e3 for g in args.gaps_ms.split(",")]
    wait_s = args.wait_ms / 1e3
    report = {
        "host": {"python": platform.python_version(), "grpcio": grpc_version(), **host_cpu()},
        "n": args.n,
        "socket_us": socket_pingpong(args.n, gaps),
        "grpc_us": grpc_calls(args.n, gaps, 0.0),
        f"grpc_worker_wait_{args.wait_ms:g}ms_us": grpc_calls(args.n, [0.0], wait_s),
        f"sleep_{args.wait_ms:g}ms_us": timed(lambda: time.sleep(wait_s), args.n, 0.0),
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
