"""Loading and unloading bundles on a running engine: the one path for start-up and AdminService.

Loading a bundle: read it, run the static pairing checks (structure, provenance), register its
adapter with the engine, warm it up, run the function checks through the engine with that
adapter, and only then put it in the registry. A bundle refused on the way leaves nothing
behind (its adapter is removed) and the others serve on. Unloading takes it out of the registry
at once, waits for the requests that hold it, then removes its adapter from the engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch

from probeserve.core.bundle import Bundle, load_bundle
from probeserve.core.errors import BundleError, ErrorKind, ProbeError
from probeserve.core.extraction import ExtractionRequest, Extractor
from probeserve.core.prompt import PieceTokenizer
from probeserve.core.registry import BundleRegistry, LoadedBundle
from probeserve.engines.config import Adapter, ServingEngine, bind
from probeserve.pairing.checks import function_checks, raise_on_failure, static_checks

log = structlog.get_logger(__name__)

WARMUP_UTTERANCE = "warm up the engine"


@dataclass(frozen=True)
class BundleSpec:
    """A bundle to serve: its directory and the name to serve it under ('' : its own name)."""

    path: Path
    name: str = ""

    @classmethod
    def parse(cls, text: str) -> BundleSpec:
        """``PATH`` or ``NAME=PATH`` (the command line's ``--bundle``)."""
        name, sep, path = text.partition("=")
        if sep and name and "/" not in name:
            return cls(Path(path), name)
        return cls(Path(text))


@dataclass(frozen=True)
class Pairing:
    """What the pairing check compares a bundle with: the served checkpoint at its precision."""

    model: Path
    precision: str
    skip: bool = False
    lora_mode: str | None = None  # how the engine applies adapters: checked against the checkpoint


def heads_beside_engine(bundle: Bundle) -> Bundle:
    """On a GPU machine the heads run on the GPU, where the engine's hidden states are made."""
    if not torch.cuda.is_available():
        return bundle
    return dataclasses.replace(bundle, heads=bundle.heads.to("cuda"))


def read_bundle(spec: BundleSpec, pairing: Pairing) -> tuple[str, Bundle]:
    """Load a bundle and run the checks that need no engine; raises BundleError or PairingError."""
    bundle = load_bundle(spec.path)
    if pairing.skip:
        log.warning(
            "pairing_check_skipped", model=str(pairing.model), bundle=bundle.name,
            note="--skip-pairing-check: nothing shows this model is the one the bundle was trained for",
        )  # fmt: skip
    else:
        raise_on_failure(static_checks(bundle, pairing.model, pairing.precision, lora_mode=pairing.lora_mode))
    return spec.name or bundle.name, heads_beside_engine(bundle)


class BundleLoader:
    """Puts bundles on the engine and takes them off again, keeping the registry in step."""

    def __init__(
        self,
        registry: BundleRegistry,
        engine: ServingEngine,
        tokenizer: PieceTokenizer,
        pairing: Pairing,
        *,
        adapter_in_weights: bool = False,
    ) -> None:
        self.registry = registry
        self.engine = engine
        self.tokenizer = tokenizer
        self.pairing = pairing
        # The engine's weights hold one bundle's adapter (merged or premerged): that bundle alone, no adapter.
        self._weights_adapter_unclaimed = adapter_in_weights
        self._adapter_names: dict[int, str] = {}  # every adapter the engine was given, until removed
        # One load or unload at a time: each pairs through the shared engine and edits the registry.
        self._lock = asyncio.Lock()

    async def load(
        self, spec: BundleSpec, *, replace: bool = False, make_default: bool = False
    ) -> tuple[LoadedBundle, LoadedBundle | None]:
        """Read, pair and serve a bundle; returns it and the version it replaced (drained)."""
        async with self._lock:
            if spec.name:
                self.registry.check_free(spec.name, replace)
            try:
                name, bundle = await asyncio.to_thread(read_bundle, spec, self.pairing)
            except BundleError as exc:
                why = f"cannot load bundle {spec.path}: {exc}"
                raise ProbeError(why, ErrorKind.INVALID_ARGUMENT) from None
            self.registry.check_free(name, replace)
            return await self._attach(name, bundle, replace=replace, make_default=make_default)

    async def attach(self, name: str, bundle: Bundle) -> LoadedBundle:
        """Serve a bundle already read (and statically checked) before the engine started."""
        async with self._lock:
            self.registry.check_free(name, replace=False)
            entry, _ = await self._attach(name, bundle, replace=False, make_default=False)
            return entry

    async def _attach(
        self, name: str, bundle: Bundle, *, replace: bool, make_default: bool
    ) -> tuple[LoadedBundle, LoadedBundle | None]:
        started = time.perf_counter()
        adapter: Adapter | None = None
        if self._weights_adapter_unclaimed:
            self._weights_adapter_unclaimed = False
        else:
            adapter = await self.engine.add_adapter(name, bundle.adapter_path, bundle.lora_rank)
            self._adapter_names[adapter.lora_id] = name
        extractor = Extractor(bundle, self.tokenizer, bind(self.engine, adapter))
        try:
            function = next(iter(bundle.functions))
            await extractor.extract(ExtractionRequest(function, WARMUP_UTTERANCE, f"warmup-{name}"))
            if not self.pairing.skip:
                precision = self.pairing.precision
                checks = await function_checks(bundle, extractor.prompts, extractor.engine, precision)
                raise_on_failure(checks)
                log.info(
                    "pairing_passed", bundle=name, checks=len(checks), precision=precision,
                    lora_mode=self.pairing.lora_mode or ("adapter" if adapter else "merged"),
                )  # fmt: skip
        except BaseException:
            if adapter is not None:
                await self._remove_adapter(adapter)
            raise
        entry = LoadedBundle(name, extractor, adapter)
        old = self.registry.add(entry, replace=replace, make_default=make_default)
        log.info(
            "bundle_loaded", bundle=name, version=bundle.version, path=str(bundle.path),
            layout=bundle.utterance_segmentation, adapter_id=adapter.lora_id if adapter else None,
            replaced=old.bundle.version if old else None, default=self.registry.default_name == name,
            load_s=round(time.perf_counter() - started, 2),
        )  # fmt: skip
        if old is not None:
            await self._release(old)
        return entry, old

    async def unload(self, name: str) -> tuple[LoadedBundle, int]:
        """Stop serving ``name``; returns it and how many admitted requests it let finish."""
        async with self._lock:
            entry = self.registry.remove(name)
            held = entry.leases
            await self._release(entry)
            log.info("bundle_unloaded", bundle=name, version=entry.bundle.version, drained_requests=held)
            return entry, held

    async def _release(self, entry: LoadedBundle) -> None:
        """Once a retired bundle's requests are answered, take its adapter out of the engine."""
        await BundleRegistry.drained(entry)
        if entry.adapter is not None:
            await self._remove_adapter(entry.adapter)

    async def _remove_adapter(self, adapter: Adapter) -> None:
        # Shielded: a caller that goes away mid-way must not leave the adapter half removed.
        await asyncio.shield(self.engine.remove_adapter(adapter))
        self._adapter_names.pop(adapter.lora_id, None)

    async def engine_adapters(self) -> list[str]:
        """The bundle names of the adapters the engine itself lists."""
        ids = await self.engine.adapter_ids()
        return sorted(self._adapter_names.get(i, f"unknown-{i}") for i in ids)
