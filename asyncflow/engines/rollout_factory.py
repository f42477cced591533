"""Builds the configured rollout engine: ``vllm`` or ``transformers``, chosen by name.

The rollout worker calls :func:`make_rollout_engine` with the config's engine name and never
imports a concrete engine itself; vLLM is imported only when it is asked for, so the
transformers engine works where vLLM is not installed.
"""

from __future__ import annotations

from typing import Any

from asyncflow.engines.protocols import RolloutEngine

ENGINES = ("vllm", "transformers")


def make_rollout_engine(engine: str, model: str, **options: Any) -> RolloutEngine:
    """A not yet started engine; ``options`` go to the engine's constructor as keywords.

    ``vllm``: :class:`~asyncflow.engines.vllm_engine.VLLMRolloutEngine` (``max_model_len``,
    ``dtype``, ``seed``, ``gpu_memory_utilization``, ``cpu_kvcache_space_gib``,
    ``cpu_threads_bind``, ``enforce_eager``, ...). ``transformers``:
    :class:`~asyncflow.engines.hf_engine.HFRolloutEngine` (``dtype``, ``device``,
    ``max_batch_size``, ``batch_window_s``, ``seed``, ...).
    """
    if engine == "vllm":
        from asyncflow.engines.vllm_engine import VLLMRolloutEngine

        return VLLMRolloutEngine(model, **options)
    if engine == "transformers":
        from asyncflow.engines.hf_engine import HFRolloutEngine

        return HFRolloutEngine(model, **options)
    raise ValueError(f"rollout engine must be one of {ENGINES}, got {engine!r}")


__all__ = ["ENGINES", "make_rollout_engine"]
