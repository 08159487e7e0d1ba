"""The memory budget of a schedule (SPEC §8): what each stage needs and the dims it runs at."""
from __future__ import annotations

import math
import os
from typing import Callable, Optional

import torch

from .config import ScheduleConfig, StageConfig
from .config import profile
from ..stencil import stencil as make_stencil

__all__ = ["stage_memory_config", "stage_estimate", "fit_stage", "device_memory"]


def device_memory() -> int:
    """Bytes of the device the run uses: the GPU's memory, else the machine's RAM."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _oriented(preset, dims) -> tuple:
    """``preset``'s sizes laid out in the order of ``dims``' sizes: the presets
    are written W×H×D-like (``(40, 40, 30)``), a stage may be ``(30, 40, 40)``
    — a reduced stage keeps its shape's orientation (its depth stays the smallest side)."""
    order = sorted(range(3), key=lambda i: dims[i])
    out = [0, 0, 0]
    for i, v in zip(order, sorted(preset)):
        out[i] = v
    return tuple(out)


def stage_memory_config(cfg: ScheduleConfig, st: StageConfig):
    """The :class:`~cellkern.MemoryConfig` of a stage (batch, channels, stencil, keep, competition).

    A freeze stage is counted as if it learned (``MemoryConfig`` needs
    something to train), an upper bound of what it holds.
    """
    from ..memory import MemoryConfig

    return MemoryConfig(stencil=cfg.stencil, batch=cfg.batch, channels=cfg.channels, keep=st.sparse_keep,
                        competition=profile(st.plasticity_profile).competition > 0)


def stage_estimate(cfg: ScheduleConfig, st: StageConfig, dims) -> int:
    """Estimated peak bytes of ``st`` at ``dims``, plus the all-True mask a
    stage without ``memory_optimizations`` holds."""
    from ..memory import memory_estimate

    mask = 0 if (st.memory_optimizations or st.sparse_keep < 1) else make_stencil(cfg.stencil).K * math.prod(dims)
    return memory_estimate(tuple(dims), stage_memory_config(cfg, st)) + mask


def fit_stage(cfg: ScheduleConfig, st: StageConfig, budget: Optional[int] = None,
              log: Callable = lambda m: None) -> tuple:
    """The dims ``st`` runs at: its own when they fit the budget; else, with
    ``progressive_scaling``, the largest preset of ``ck.PROGRESSION`` with no
    more cells that fits, laid out like ``st.dims`` (logged); without it a ``ValueError``.

    Args:
        budget: bytes; None takes ``cfg.budget``, else :func:`device_memory`.
    """
    from ..memory import PROGRESSION

    budget = budget or cfg.budget_bytes() or device_memory()
    need = stage_estimate(cfg, st, st.dims)
    if need <= budget:
        return tuple(st.dims)
    if not st.progressive_scaling:
        raise ValueError(f"stage {st.name!r}: dims {tuple(st.dims)} need {need} bytes, more than the budget of "
                         f"{budget} bytes, and progressive_scaling is off")
    cells = math.prod(st.dims)
    for preset in sorted(PROGRESSION, key=math.prod, reverse=True):
        d = _oriented(preset, st.dims)
        if math.prod(d) <= cells and stage_estimate(cfg, st, d) <= budget:
            log(f"stage {st.name!r}: {'x'.join(map(str, st.dims))} needs {need / 2**20:.1f} MiB, over the "
                f"budget of {budget / 2**20:.1f} MiB; reduced to {'x'.join(map(str, d))}")
            return tuple(d)
    raise ValueError(f"stage {st.name!r}: no dims of the progression up to {tuple(st.dims)} fit the budget of "
                     f"{budget} bytes")
