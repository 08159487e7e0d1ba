"""Seeded stochastic rounding of weights to fp16/bf16 (SPEC §5, mixed precision).

A plasticity step on fp16/bf16 weights computes the new weights in fp32 and
rounds each one to its dtype *stochastically*: a value ``x`` between the two
representable neighbours ``lo < x < hi`` becomes ``hi`` with probability
``(x − lo)/(hi − lo)``, else ``lo``, so ``E[round(x)] = x`` and updates far
below the spacing of the dtype (bf16 near 0.5: 2⁻⁹ ≈ 0.002; the default STDP
rates give updates of ~1e-4) accumulate on average instead of being rounded
away every step.

The uniform of synapse ``j`` (its dense index ``k·N + i``, the same in the
dense and the ELL form) at step ``step`` is a counter-based hash of
``(seed, step, j)`` — no generator state, the same numbers on every backend
and device, so runs are reproducible and backends agree exactly.
"""
from __future__ import annotations

import itertools

import torch

__all__ = ["hash_uniform", "stochastic_round", "round_weights_", "next_step"]

_M32 = 0xFFFFFFFF
_counter = itertools.count()


def next_step() -> int:
    """A process-wide step counter: the ``step`` of a plasticity op called without one."""
    return next(_counter)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash ("lowbias32"), on int64 tensors holding values < 2³²."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def hash_uniform(seed: int, step: int, index: torch.Tensor) -> torch.Tensor:
    """Uniform numbers in [0, 1) (24 bits, float64) for every element of
    ``index`` (int64), a deterministic function of ``(seed, step, index)``::

        key = mix(mix(seed) ^ step) ;  u = (mix(key ^ mix(j_lo) ^ j_hi) >> 8) / 2²⁴

    with ``mix`` the 32-bit "lowbias32" hash and ``j_lo``/``j_hi`` the low
    and high 32 bits of the index.
    """
    key = _mix32_int(_mix32_int(seed) ^ (step & _M32) ^ _mix32_int(step >> 32))
    lo, hi = index & _M32, (index >> 32) & _M32
    h = _mix32((_mix32(lo) ^ hi) ^ key)
    return (h >> 8).to(torch.float64) * (1.0 / (1 << 24))


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, u: torch.Tensor) -> torch.Tensor:
    """``x`` (fp32/fp64) rounded to ``dtype`` up or down at random, unbiased:
    the far neighbour is taken where ``u < (x − near)/(far − near)``.
    Representable values (e.g. weights that did not change) stay exactly."""
    y = x.to(dtype)
    yx = y.to(x.dtype)
    away = torch.where(yx > x, -torch.inf, torch.inf).to(dtype)
    other = torch.nextafter(y, away)
    ox = other.to(x.dtype)
    gap = ox - yx
    p = torch.where((gap != 0) & torch.isfinite(gap), (x - yx) / torch.where(gap != 0, gap, 1.0), 0.0)
    return torch.where(u.to(x.dtype) < p, other, y)


def round_weights_(out: torch.Tensor, new: torch.Tensor, seed: int, step: int) -> torch.Tensor:
    """``out`` (fp16/bf16 ``[K, D, H, W]``) ← ``new`` (fp32, same shape)
    stochastically rounded, the uniform of element ``j`` (flat index
    ``k·N + i``) from :func:`hash_uniform`. One offset plane at a time, so
    the temporaries stay ~N elements."""
    N = new[0].numel()
    base = torch.arange(N, dtype=torch.int64, device=new.device).view(new.shape[1:])
    for k in range(new.shape[0]):
        out[k] = stochastic_round(new[k], out.dtype, hash_uniform(seed, step, base + k * N))
    return out
