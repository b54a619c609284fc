"""Load testing a probeserve deployment: ``probeserve-client loadtest`` and its parts.

    probeserve-client loadtest --target HOST:PORT --rate 20 --duration 10 --out r.json --plot r.png

Closed loop (``--concurrency``) or open loop (``--rate``, Poisson arrivals, no coordinated
omission); unary, batch or stream calls; latencies in an HdrHistogram; errors by status code;
a ghz-style summary, a JSON report and a PNG. Needs the extra: ``pip install
'probeserve-client[loadtest]'`` (hdrhistogram, and matplotlib for ``--plot``).

From Python::

    async with AsyncProbeClient(target, retries=0) as client:
        run = await run_load(client, LoadSettings(rate=20, duration_s=10), items)
"""

from probeserve_client.loadtest._inputs import items_from_info
from probeserve_client.loadtest._plot import plot
from probeserve_client.loadtest._report import build_report, summary
from probeserve_client.loadtest._run import LoadRun, LoadSettings, Recorder, run_load

__all__ = [
    "LoadRun",
    "LoadSettings",
    "Recorder",
    "build_report",
    "items_from_info",
    "plot",
    "run_load",
    "summary",
]
