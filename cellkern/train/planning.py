"""The memory budget of a schedule (SPEC §8): what each stage needs and the dims it runs at."""
from __future__ import annotations

import math
import os
from typing import Callable, Optional

import torch

from .config import ScheduleConfig, StageConfig, check_device
from .config import profile
from ..stencil import stencil as make_stencil

__all__ = ["stage_memory_config", "stage_estimate", "fit_stage", "device_memory", "resolve_device"]


def resolve_device(device) -> torch.device:
    """The ``torch.device`` a run uses for the config value ``device``.

    ``"cpu"``; ``"cuda"`` or ``"cuda:N"`` (an error naming the key when torch
    sees no such GPU); ``"auto"``: the current GPU when torch sees one, else the
    CPU. A ``torch.device`` is taken by its name.
    """
    name = check_device(device)
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cpu":
        return dev
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise ValueError(f"config: device is {name!r}, but torch sees no CUDA device ({why}); "
                         f"use device = \"cpu\" or \"auto\" (cellkern run --device cpu)")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"config: device is {name!r}, but torch sees {torch.cuda.device_count()} CUDA "
                         f"device(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return torch.device("cuda", index)


def device_memory(device=None) -> int:
    """Bytes of memory of ``device`` (a ``torch.device`` or a config value):
    a GPU's total memory, the CPU's physical RAM. None: the GPU's memory when
    torch sees one, else the RAM."""
    if device is None:
        device = "auto"
    device = resolve_device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
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
        budget: bytes; None takes ``cfg.budget``, else the memory of the run's
            device (``cfg.device``, :func:`device_memory`).
    """
    from ..memory import PROGRESSION

    budget = budget or cfg.budget_bytes() or device_memory(cfg.device)
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
