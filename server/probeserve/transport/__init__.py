"""The gRPC transport: a thin layer that turns calls into core requests and results into replies.

``servicer`` holds the RPC handlers and the one error-to-status table, ``messages`` the
protobuf conversions, ``admission`` the in-flight limit, ``auth`` the bearer-token interceptor,
``metrics`` the Prometheus series, and ``server`` assembles gRPC, health, reflection, the
pairing check and the engine.

May import: every room below it (``probeserve.core``, ``probeserve.engines``,
``probeserve.pairing``), grpc and the generated stubs of ``probeserve_client``. Only the
engines room imports vLLM.
"""
