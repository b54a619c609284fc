"""The gRPC transport: a thin layer that turns calls into core requests and results into replies.

``servicer`` holds the ProbeService handlers and the one error-to-status table, ``admin`` the
AdminService handlers, ``bundles`` the one path that puts a bundle on the engine (read, pair,
register its adapter) and takes it off, ``messages`` the protobuf conversions, ``admission`` the
in-flight limit, ``auth`` the bearer-token interceptor, ``metrics`` the Prometheus series, and
``server`` assembles gRPC, health, reflection, the engine and the start-up bundles.

May import: every room below it (``probeserve.core``, ``probeserve.engines``,
``probeserve.pairing``), grpc and the generated stubs of ``probeserve_client``. Only the
engines room imports vLLM.
"""
