"""AdminService: load, unload and list bundles while the server keeps serving (``--admin``).

Each handler delegates to the :class:`BundleLoader`, which serves start-up bundles the same way;
a pairing failure comes back as ``FAILED_PRECONDITION`` with the failed check's message.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import structlog

from probeserve.core.errors import EngineUnavailableError, InvalidRequestError, ProbeError
from probeserve.transport import messages
from probeserve.transport.bundles import BundleLoader, BundleSpec
from probeserve.transport.metrics import Metrics
from probeserve.transport.servicer import STATUS_CODES, ServingState
from probeserve_client._proto.probeserve.v1 import admin_service_pb2 as admin_pb
from probeserve_client._proto.probeserve.v1 import admin_service_pb2_grpc as admin_grpc

log = structlog.get_logger(__name__)
Context = grpc.aio.ServicerContext


class AdminServicer(admin_grpc.AdminServiceServicer):
    """AdminService on grpc.aio; ``loader`` is None until the engine is up."""

    def __init__(self, state: ServingState) -> None:
        self.state = state
        self.metrics: Metrics = state.metrics
        self.loader: BundleLoader | None = None

    def _ready_loader(self) -> BundleLoader:
        if self.loader is None or not self.state.ready:
            raise EngineUnavailableError("the server is starting: bundles can be loaded once it is SERVING")
        return self.loader

    async def _fail(self, context: Context[Any, Any], rpc: str, error: ProbeError) -> None:
        code = STATUS_CODES[error.kind]  # a refused pairing is FAILED_PRECONDITION
        self.metrics.calls.labels(rpc, code.name).inc()
        log.info("admin", rpc=rpc, status=code.name, error=error.message)
        await context.abort(code, error.message)

    async def LoadBundle(
        self,
        request: admin_pb.LoadBundleRequest,
        context: Context[admin_pb.LoadBundleRequest, admin_pb.LoadBundleResponse],
    ) -> admin_pb.LoadBundleResponse:
        started = time.perf_counter()
        if not request.path:
            await self._fail(context, "LoadBundle", InvalidRequestError("path is required"))
        try:
            loader = self._ready_loader()
            entry, old = await loader.load(
                BundleSpec(Path(request.path), request.name),
                replace=request.replace,
                make_default=request.make_default,
            )
        except ProbeError as error:
            await self._fail(context, "LoadBundle", error)
        self.metrics.calls.labels("LoadBundle", "OK").inc()
        response = admin_pb.LoadBundleResponse(
            bundle=messages.bundle_info(entry, self.state.registry.default_name),
            load_seconds=time.perf_counter() - started,
        )
        if old is not None:
            response.replaced_version = old.bundle.version
        return response

    async def UnloadBundle(
        self,
        request: admin_pb.UnloadBundleRequest,
        context: Context[admin_pb.UnloadBundleRequest, admin_pb.UnloadBundleResponse],
    ) -> admin_pb.UnloadBundleResponse:
        try:
            entry, drained = await self._ready_loader().unload(request.name)
        except ProbeError as error:
            await self._fail(context, "UnloadBundle", error)
        self.metrics.calls.labels("UnloadBundle", "OK").inc()
        return admin_pb.UnloadBundleResponse(bundle=messages.bundle_info(entry, ""), drained_requests=drained)

    async def ListBundles(
        self,
        request: admin_pb.ListBundlesRequest,
        context: Context[admin_pb.ListBundlesRequest, admin_pb.ListBundlesResponse],
    ) -> admin_pb.ListBundlesResponse:
        registry = self.state.registry
        try:
            adapters = await self._ready_loader().engine_adapters()
        except ProbeError as error:
            await self._fail(context, "ListBundles", error)
        self.metrics.calls.labels("ListBundles", "OK").inc()
        return admin_pb.ListBundlesResponse(
            bundles=[messages.bundle_info(e, registry.default_name) for e in registry.entries()],
            engine_adapters=adapters,
        )
