"""Starting an engine: the one place that knows both adapters."""

from __future__ import annotations

from probeserve.engines.config import EngineConfig, ServingEngine
from probeserve.engines.process import VllmEngine


def start_engine(config: EngineConfig) -> ServingEngine:
    """vLLM's engine core in its own process, or (``config.inline``) in this one."""
    if config.inline:
        from probeserve.engines.inline import InlineEngine

        return InlineEngine.start(config)
    return VllmEngine.start(config)
