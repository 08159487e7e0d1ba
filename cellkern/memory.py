"""Memory budget (SPEC §5, §8): how many bytes a lattice needs, and the largest that fits.

:func:`memory_estimate` counts the peak of one training step the way the ops
allocate it (``ck.ops.propagate`` → ``ck.ops.activity`` →
``ck.ops.plasticity_step_``, and ``propagate_steps`` + backward for autograd):

* **held for the whole run** — the state ``s`` ``(B, C, D, H, W)``, the external
  drive (shaped like ``s``), the weights ``(K, D, H, W)`` and their mask (dense
  with ``keep < 1``) or the ELL pair of SPEC §5 (``Kmax = floor(keep·K + 1/2)`` slots of
  weights + ``uint8`` offset indices), the STDP traces ``x_pre, x_post``
  ``(B, D, H, W)``, θ ``(D, H, W)``, optimizer buffers, and the CPU kernel's
  inhibition scratch (``csrc/cpu/plasticity.cpp`` keeps one ``(B, D, H, W)``
  buffer per thread for good when it is at most 256 MiB);
* **during the step** — the next state ``s'``, then the largest of: the
  activity temporaries (``s' − s`` and its absolute value), the activity ``y``
  with the inhibited ``y'`` (when the scratch is not kept) and the
  fp32 copies the kernel makes of fp16/bf16 traces, and — with ``autograd`` —
  the saved tensors of ``steps`` updates (each saves its output and the fp32
  pre-activation ``u``; with ``checkpoint_every=k`` only ``⌈T/k⌉`` states plus
  one recomputed segment of ``k`` steps) with ``w``'s gradient and the
  gradient of the step being added to it. ELL weights (SPEC §5) learn and
  backpropagate through their dense masked form: plasticity and backward
  then also hold a dense ``w``, its bool mask (and, in backward, the dense
  ``dw``) for the duration of the op.

The estimate is checked against the peak the torch profiler sees (every torch
allocation, CPU) in ``python_tests/test_memory.py`` and at 300×300×150 by
``python -m benchmarks.memory_budget``. Kernel-internal row buffers (a few
rows per thread) are not counted.
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .contract import accumulation_dtype
from .stencil import Stencil
from .stencil import stencil as make_stencil

__all__ = ["MemoryConfig", "memory_estimate", "memory_breakdown", "fit_dims", "parse_bytes", "PROGRESSION"]

#: The dims presets of SPEC §8, smallest first, as the SPEC writes them.
PROGRESSION = (
    (16, 16, 16), (20, 20, 20), (24, 24, 24), (32, 32, 24), (40, 40, 30),
    (48, 48, 36), (64, 64, 48), (128, 128, 64), (300, 300, 150), (666, 666, 333),
)

SPARSE_FORMATS = ("dense", "ell")
#: The CPU kernel keeps its inhibition scratch only up to this size (csrc/cpu/plasticity.cpp).
SCRATCH_CACHE_LIMIT = 256 << 20


def _pos_int(name, v):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"MemoryConfig: {name} must be a positive int, got {v!r}")
    return int(v)


def _float_dtype(name, v):
    if not (isinstance(v, torch.dtype) and v.is_floating_point):
        raise TypeError(f"MemoryConfig: {name} must be a floating torch.dtype, got {v!r}")
    return v


@dataclass(frozen=True)
class MemoryConfig:
    """What a run holds in memory, for :func:`memory_estimate` and :func:`fit_dims`.

    Args:
        stencil: a stencil name or :class:`~cellkern.Stencil` (gives K). Default: ``"moore"``.
        weight_dtype: dtype of ``w``. When it differs from ``state_dtype``, each
            step also holds ``w`` cast to the state dtype (propagation takes
            weights in the dtype of ``s``). Default: float32.
        state_dtype: dtype of ``s``, the drive, traces, θ and activity. Default: float32.
        batch: B. Default: 1.
        channels: C, channels per cell. Default: 1.
        keep: the live fraction of synapses after pruning, in (0, 1]; below 1 a
            dense run holds a bool mask, an ELL run ``floor(keep·K + 1/2)`` slots (``ck.sparse.keep_count``). Default: 1.
        sparse_format: ``"dense"`` (``w`` + mask) or ``"ell"`` (SPEC §5). Default: dense.
        autograd: gradient training through ``propagate_steps``. Default: False.
        steps: T, the unrolled updates of one backward (autograd only). Default: 1.
        checkpoint_every: k, ``propagate_steps``' checkpointing (autograd only).
            Default: None (every step saved).
        optimizer_slots: buffers shaped like ``w`` the optimizer keeps (SGD 0,
            momentum 1, Adam 2; autograd only). Default: 0.
        plasticity: the local rules run (traces, θ, activity). Default: True.
        competition: lateral inhibition runs (the kernel's y' scratch). Default: True.
        drive: an external drive shaped like ``s`` is held. Default: True.

    Example:
        >>> import cellkern as ck
        >>> ck.MemoryConfig(keep=0.3, sparse_format="ell").slots
        8
    """

    stencil: Union[str, Stencil] = "moore"
    weight_dtype: torch.dtype = torch.float32
    state_dtype: torch.dtype = torch.float32
    batch: int = 1
    channels: int = 1
    keep: float = 1.0
    sparse_format: str = "dense"
    autograd: bool = False
    steps: int = 1
    checkpoint_every: Optional[int] = None
    optimizer_slots: int = 0
    plasticity: bool = True
    competition: bool = True
    drive: bool = True

    def __post_init__(self):
        try:
            make_stencil(self.stencil)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"MemoryConfig: stencil: {exc}") from None
        _float_dtype("weight_dtype", self.weight_dtype)
        _float_dtype("state_dtype", self.state_dtype)
        _pos_int("batch", self.batch)
        _pos_int("channels", self.channels)
        _pos_int("steps", self.steps)
        if self.checkpoint_every is not None:
            _pos_int("checkpoint_every", self.checkpoint_every)
        if isinstance(self.optimizer_slots, bool) or not isinstance(self.optimizer_slots, numbers.Integral) \
                or self.optimizer_slots < 0:
            raise ValueError(f"MemoryConfig: optimizer_slots must be an int >= 0, got {self.optimizer_slots!r}")
        if isinstance(self.keep, bool) or not isinstance(self.keep, numbers.Real) or not 0 < self.keep <= 1:
            raise ValueError(f"MemoryConfig: keep must be a number in (0, 1], got {self.keep!r}")
        if self.sparse_format not in SPARSE_FORMATS:
            raise ValueError(f"MemoryConfig: sparse_format must be one of {', '.join(SPARSE_FORMATS)}, "
                             f"got {self.sparse_format!r}")
        for name in ("autograd", "plasticity", "competition", "drive"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"MemoryConfig: {name} must be a bool, got {type(getattr(self, name)).__name__}")
        if not self.autograd and (self.steps != 1 or self.checkpoint_every is not None or self.optimizer_slots):
            raise ValueError("MemoryConfig: steps, checkpoint_every and optimizer_slots describe gradient "
                             f"training; set autograd=True to use them, got steps={self.steps}, "
                             f"checkpoint_every={self.checkpoint_every}, optimizer_slots={self.optimizer_slots}")
        if self.checkpoint_every is not None and self.checkpoint_every > self.steps:
            raise ValueError(f"MemoryConfig: checkpoint_every must be <= steps ({self.steps}), "
                             f"got {self.checkpoint_every}")
        if not (self.plasticity or self.autograd):
            raise ValueError("MemoryConfig: nothing trains: plasticity=False needs autograd=True")

    @property
    def K(self) -> int:
        """Synapses per cell of the stencil."""
        return make_stencil(self.stencil).K

    @property
    def slots(self) -> int:
        """Weight slots per cell: K (dense) or ``Kmax = floor(keep·K + 1/2)`` (ELL: what ``ck.sparse.prune`` keeps)."""
        if self.sparse_format == "dense":
            return self.K
        return max(1, math.floor(self.keep * self.K + 0.5))


def _check_dims(op, dims):
    if isinstance(dims, torch.Size):
        dims = tuple(dims)
    if not (isinstance(dims, (tuple, list)) and len(dims) == 3 and all(
            isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in dims)):
        raise ValueError(f"{op}: dims must be 3 positive ints (D, H, W), got {dims!r}")
    return tuple(int(d) for d in dims)


def _check_config(op, config):
    if not isinstance(config, MemoryConfig):
        raise TypeError(f"{op}: config must be a cellkern.MemoryConfig, got {type(config).__name__}")
    return config


def memory_breakdown(dims, config: MemoryConfig = MemoryConfig()) -> dict:
    """The bytes of each tensor :func:`memory_estimate` counts, by name.

    The persistent tensors always appear; of the step's workspaces only those
    of the phase with the largest peak (activity, plasticity or backward).

    Returns:
        ``{name: bytes}`` whose values sum to ``memory_estimate(dims, config)``.
    """
    op = "memory_breakdown"
    dims, c = _check_dims(op, dims), _check_config(op, config)
    N = dims[0] * dims[1] * dims[2]
    sd, wd = c.state_dtype.itemsize, c.weight_dtype.itemsize
    acc = accumulation_dtype(c.state_dtype).itemsize
    BN, BCN = c.batch * N, c.batch * c.channels * N
    out = {"state": BCN * sd}
    if c.drive:
        out["drive"] = BCN * sd
    out["weights"] = c.slots * N * wd
    if c.sparse_format == "ell":
        out["ell_index"] = c.slots * N
    elif c.keep < 1:
        out["mask"] = c.K * N
    if c.autograd and c.optimizer_slots:
        out["optimizer"] = c.optimizer_slots * c.slots * N * wd
    scratch_kept = False
    if c.plasticity:
        out["traces"] = 2 * BN * sd
        out["theta"] = N * sd
        if c.competition and BN * acc <= SCRATCH_CACHE_LIMIT:
            out["inhibition_scratch"] = BN * acc
            scratch_kept = True
    out["state_next"] = BCN * sd
    cast = c.slots * N * sd if c.weight_dtype != c.state_dtype else 0
    phases = {"propagate": {"weights_cast": cast} if cast else {}}
    if c.plasticity:
        low = c.state_dtype.itemsize < acc  # fp16/bf16 state: the ops work on fp32 copies
        # s' − s and its |.| (after fp32 copies of both states when the state is low precision)
        phases["activity"] = {"activity_temporaries": (3 if low else 2) * BCN * acc}
        plast = {"activity": BN * sd}
        if c.competition and not scratch_kept:
            plast["inhibition_scratch"] = BN * acc
        if low:  # the kernel's fp32 copies of y (replaced by y' under competition), traces and θ
            plast["state_casts"] = ((2 if c.competition else 3) * BN + N) * acc
        if c.sparse_format == "ell":  # plasticity on ELL weights runs on their dense masked form
            plast.update(ell_dense_weights=c.K * N * wd, ell_dense_mask=c.K * N)
        if wd < 4:  # fp16/bf16 weights learn in an fp32 working copy, rounded back stochastically
            plast["weights_fp32_work"] = (c.K if c.sparse_format == "ell" else c.slots) * N * 4
        phases["plasticity"] = plast
    if c.autograd:
        T, k = c.steps, c.checkpoint_every
        # Peak: backward of the second-last update, while the gradient of w is
        # being summed. Each update saves its output and the fp32 pre-activation
        # u (the last output is state_next, and its own tensors are gone by
        # then); checkpointing keeps each segment's first state (the first is
        # s) and the recomputed tensors of one segment.
        per_step = BCN * (sd + acc)
        if T == 1:
            saved = BCN * acc
        elif k is None:
            saved = (T - 1) * per_step - BCN * sd
        else:
            saved = (math.ceil(T / k) - 1) * BCN * sd + (k - 1) * per_step
        back = {"saved_activations": saved, "grad_w": c.slots * N * (wd + (sd if T > 1 else 0)),
                "grad_state": BCN * ((2 if T > 1 else 1) * sd + acc)}
        if cast:
            back["weights_cast"] = cast
        if c.sparse_format == "ell":  # the backward of ELL weights runs on their dense form: w, mask and dw
            back.update(ell_dense_weights=c.K * N * wd, ell_dense_mask=c.K * N, ell_dense_grad=c.K * N * wd)
        phases["backward"] = back
    out.update(max(phases.values(), key=lambda p: sum(p.values())))
    return out


def memory_estimate(dims, config: MemoryConfig = MemoryConfig()) -> int:
    """Peak bytes of one training step on a ``dims`` lattice (SPEC §5).

    Args:
        dims: ``(D, H, W)``.
        config: a :class:`MemoryConfig`. Default: ``MemoryConfig()``.

    Returns:
        bytes (int): the sum of :func:`memory_breakdown`.

    Example:
        >>> import cellkern as ck
        >>> round(ck.memory_estimate((666, 666, 333)) / 2**30, 1)
        18.7
    """
    return int(sum(memory_breakdown(dims, config).values()))


def fit_dims(budget_bytes, config: MemoryConfig = MemoryConfig(), progression=None) -> tuple:
    """The largest dims of ``progression`` whose :func:`memory_estimate` fits the budget.

    Args:
        budget_bytes: bytes (int) or a size string such as ``"24GiB"`` (see :func:`parse_bytes`).
        config: a :class:`MemoryConfig`. Default: ``MemoryConfig()``.
        progression: dims to choose from. Default: :data:`PROGRESSION`.

    Returns:
        ``(D, H, W)``, the fitting dims with the most cells.

    Raises:
        ValueError: when no dims fit (the message names the budget and the
            smallest need).

    Example:
        >>> import cellkern as ck
        >>> ck.fit_dims(24 * 2**30, ck.MemoryConfig())
        (666, 666, 333)
    """
    op = "fit_dims"
    budget = parse_bytes(budget_bytes)
    c = _check_config(op, config)
    prog = PROGRESSION if progression is None else progression
    if isinstance(prog, (str, bytes)) or not hasattr(prog, "__iter__"):
        raise TypeError(f"{op}: progression must be a sequence of (D, H, W), got {type(prog).__name__}")
    prog = [_check_dims(f"{op}: progression", d) for d in prog]
    if not prog:
        raise ValueError(f"{op}: progression must not be empty")
    need = {d: memory_estimate(d, c) for d in prog}
    fits = [d for d in prog if need[d] <= budget]
    if not fits:
        d = min(prog, key=need.get)
        raise ValueError(f"{op}: no dims of the progression fit the budget of {budget} bytes "
                         f"({budget / 2**30:.3g} GiB); the smallest, {d}, needs {need[d]} bytes")
    return max(fits, key=lambda d: (d[0] * d[1] * d[2], prog.index(d)))


_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_bytes(size) -> int:
    """A size in bytes from an int or a string: ``"24GB"`` (10⁹), ``"24GiB"`` (2³⁰),
    ``"1.5 TiB"``; a bare ``K``/``M``/``G``/``T`` is binary (``"24G"`` = 24 GiB).

    Example:
        >>> from cellkern.memory import parse_bytes
        >>> parse_bytes("24GiB") == 24 * 2**30, parse_bytes("2GB")
        (True, 2000000000)
    """
    if isinstance(size, bool):
        raise TypeError(f"parse_bytes: size must be an int or a string like '24GiB', got {size!r}")
    if isinstance(size, numbers.Integral):
        n = int(size)
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", size)
        unit = m.group(2).lower() if m else None
        if unit not in _UNITS:
            raise ValueError(f"parse_bytes: size must look like '24GB', '24GiB' or '512MiB', got {size!r}")
        n = int(float(m.group(1)) * _UNITS[unit])
    else:
        raise TypeError(f"parse_bytes: size must be an int or a string like '24GiB', got {type(size).__name__}")
    if n <= 0:
        raise ValueError(f"parse_bytes: size must be positive, got {size!r}")
    return n
