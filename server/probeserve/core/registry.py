"""The loaded bundles by name: which one answers a request, and when a retired one is idle.

A request takes a *lease* on its bundle when it starts and gives it back once answered.
Replacing or unloading a bundle takes its entry out of the table at once, so the next request
sees the new version (or ``NOT_FOUND``); the retired entry stays usable by the requests that
already hold a lease, and :meth:`BundleRegistry.drained` says when the last one is back, which is
when its adapter may leave the engine. Everything here runs on one event loop, so each change is
atomic from a caller's view: every request is answered by exactly one version.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from probeserve.core.bundle import Bundle
from probeserve.core.errors import ErrorKind, ProbeError
from probeserve.core.extraction import Extractor


@dataclass(eq=False)
class LoadedBundle:
    """One served bundle: its name, its pipeline, and the engine's handle of its adapter."""

    name: str
    extractor: Extractor
    adapter: Any = None  # the engine's Adapter; None when the adapter is merged into the weights
    leases: int = 0
    retired: bool = False
    _idle: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def bundle(self) -> Bundle:
        return self.extractor.bundle


class BundleRegistry:
    """Name -> :class:`LoadedBundle`, with a default for requests that name none."""

    def __init__(self) -> None:
        self._entries: dict[str, LoadedBundle] = {}
        self._default = ""

    @property
    def default_name(self) -> str:
        return self._default

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def entries(self) -> list[LoadedBundle]:
        """The default bundle first, then the others by name."""
        return sorted(self._entries.values(), key=lambda e: (e.name != self._default, e.name))

    def get(self, name: str) -> LoadedBundle:
        """The bundle called ``name`` (empty: the default); ``NOT_FOUND`` naming what is loaded."""
        entry = self._entries.get(name or self._default)
        if entry is None:
            loaded = ", ".join(repr(n) for n in sorted(self._entries)) or "none"
            what = f"bundle {name!r} is not loaded" if name else "no bundle is loaded"
            raise ProbeError(f"{what}; loaded: {loaded}", ErrorKind.NOT_FOUND)
        return entry

    @contextmanager
    def lease(self, name: str) -> Iterator[LoadedBundle]:
        """Hold the bundle for one request: a retired bundle waits for it before it goes."""
        entry = self.get(name)
        entry.leases += 1
        try:
            yield entry
        finally:
            entry.leases -= 1
            if entry.retired and entry.leases == 0:
                entry._idle.set()

    def check_free(self, name: str, replace: bool) -> None:
        """Refuse early (before any loading work) a name in use that is not to be replaced."""
        if name in self._entries and not replace:
            raise ProbeError(
                f"a bundle named {name!r} is already loaded (version "
                f"{self._entries[name].bundle.version}); ask to replace it, or choose another name",
                ErrorKind.ALREADY_EXISTS,
            )

    def add(
        self, entry: LoadedBundle, *, replace: bool = False, make_default: bool = False
    ) -> LoadedBundle | None:
        """Serve ``entry`` under its name; returns the entry it replaced (retired), if any.

        The first bundle added becomes the default.
        """
        self.check_free(entry.name, replace)
        old = self._entries.get(entry.name)
        self._entries[entry.name] = entry
        if make_default or not self._default:
            self._default = entry.name
        if old is not None:
            self._retire(old)
        return old

    def remove(self, name: str) -> LoadedBundle:
        """Stop serving ``name``; returns its (retired) entry. The default cannot be removed."""
        entry = self.get(name) if name else None
        if entry is None:
            raise ProbeError("name the bundle to unload", ErrorKind.INVALID_ARGUMENT)
        if name == self._default:
            raise ProbeError(
                f"bundle {name!r} is the default (it answers requests that name no bundle); "
                "load or name another one as the default first",
                ErrorKind.FAILED_PRECONDITION,
            )
        del self._entries[name]
        self._retire(entry)
        return entry

    def clear(self) -> list[LoadedBundle]:
        """Retire every bundle (shutdown)."""
        entries = list(self._entries.values())
        self._entries.clear()
        self._default = ""
        for entry in entries:
            self._retire(entry)
        return entries

    @staticmethod
    def _retire(entry: LoadedBundle) -> None:
        entry.retired = True
        if entry.leases == 0:
            entry._idle.set()

    @staticmethod
    async def drained(entry: LoadedBundle) -> None:
        """Wait until a retired bundle's last lease is back."""
        if not entry.retired:
            raise ValueError(f"bundle {entry.name!r} is still served")
        await entry._idle.wait()
