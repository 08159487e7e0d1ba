"""What the Triton kernels share: tuning configurations, the row-tile grid,
the neighbour arithmetic of a stencil tile, and the launch helpers."""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}


def configs():
    """num_warps candidates; one config under the interpreter (STYLE rule 9).

    Tiles are sized by the launchers (up to 2048 fp32 accumulators); 2 warps
    would need ~250 registers a thread for the largest ones, so 4 and 8 only.
    """
    if INTERPRET:
        return [triton.Config({}, num_warps=4)]
    return [triton.Config({}, num_warps=nw) for nw in (4, 8)]


def _tile_configs():
    """``BLOCK_X`` × num_warps candidates of the kernels whose program owns a
    ``[K_PAD, BLOCK_X]`` tile (all offsets of ``BLOCK_X`` cells of one row).

    On a GPU the autotuner picks among 16/32/64 cells (64-256-byte row segments
    per offset plane) and 4/8 warps; :func:`_prune_tiles` keeps one candidate
    for small lattices, where tuning costs more than it saves. One fixed small
    tile under the interpreter (tiny test lattices still cross tile edges).
    """
    if INTERPRET:
        return [triton.Config({"BLOCK_X": 8}, num_warps=4)]
    return [triton.Config({"BLOCK_X": bx}, num_warps=nw) for bx in (16, 32, 64) for nw in (4, 8)]


def _prune_tiles(configs, named_args, **kwargs):
    """Tiles no wider than the row (≥ 16); only the first candidate below 2¹⁸ cells."""
    W = named_args["W"]
    cap = max(16, triton.next_power_of_2(W))
    keep = [c for c in configs if c.kwargs["BLOCK_X"] <= cap]
    if named_args["D"] * named_args["H"] * W < 2**18:
        keep = keep[:1]
    return keep or configs[:1]


TILE_TUNING = dict(configs=_tile_configs(), prune_configs_by={"early_config_prune": _prune_tiles})


def tile_grid(D: int, H: int, W: int):
    """Grid of the tile kernels: one row per axis-0 program, x-blocks on axis 1."""
    return lambda meta: (D * H, triton.cdiv(W, meta["BLOCK_X"]))


@triton.jit
def neighbour(pos, d, n, PERIODIC: tl.constexpr):
    """Index ``pos + d`` along an axis of length ``n`` and whether it exists.

    Periodic: a true modulo, taken on ``d`` (often a scalar) so that the
    per-element cost is one compare-and-subtract. Zero: ``pos + d`` and a
    validity flag (the caller masks its loads with it).
    """
    if PERIODIC:
        dm = ((d % n) + n) % n
        q = pos + dm
        q = tl.where(q >= n, q - n, q)
        ok = q >= 0
    else:
        q = pos + d
        ok = (q >= 0) & (q < n)
    return q, ok


@triton.jit
def stencil_tile(p_off, D, H, W, K, PZ: tl.constexpr, PY: tl.constexpr, PX: tl.constexpr,
                  K_PAD: tl.constexpr, BLOCK_X: tl.constexpr):
    """This program's ``[K_PAD, BLOCK_X]`` neighbour tile: ``BLOCK_X`` cells ``x``
    of lattice row ``program_id(0)`` (x-block ``program_id(1)``), all offsets.

    Returns the cells ``x`` and their mask, the offset index ``kk`` and its mask,
    the int64 neighbour index ``nbr(i,k)``, whether that neighbour exists (inside
    a zero boundary, ``k < K``, ``x < W``), ``N = D·H·W`` and the cells' index ``i``.
    """
    row = tl.program_id(0).to(tl.int64)
    x = tl.program_id(1) * BLOCK_X + tl.arange(0, BLOCK_X)
    m_x = x < W
    z = row // H
    y = row % H
    kk = tl.arange(0, K_PAD)
    m_k = kk < K
    dz = tl.load(p_off + 3 * kk, mask=m_k, other=0)
    dy = tl.load(p_off + 3 * kk + 1, mask=m_k, other=0)
    dx = tl.load(p_off + 3 * kk + 2, mask=m_k, other=0)
    zz, ok_z = neighbour(z, dz, D, PZ)
    yy, ok_y = neighbour(y, dy, H, PY)
    xx, ok_x = neighbour(x[None, :], dx[:, None], W, PX)
    m_kx = (m_k & ok_z & ok_y)[:, None] & ok_x & m_x[None, :]
    p_nbr = ((zz * H + yy) * W)[:, None] + xx
    return x, m_x, kk, m_k, p_nbr, m_kx, tl.cast(D, tl.int64) * H * W, row * W + x


def on_device(t: torch.Tensor):
    """Launch on the tensor's GPU (Triton uses the current device), not cuda:0."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def mask_u8(mask):
    return None if mask is None else mask.view(torch.uint8)


@triton.jit
def _tanh(u):
    """tanh without libdevice: ``sign(u)·(1-e)/(1+e)``, ``e = exp(-2|u|)``
    (no overflow for large |u|), a short series near 0 against cancellation."""
    au = tl.abs(u)
    e = tl.exp(-2.0 * au)
    t = (1.0 - e) / (1.0 + e)
    if u.dtype == tl.float32:  # fp64 has the digits to spare
        u2 = au * au
        t = tl.where(au < 0.0625, au * (1.0 - u2 * (1.0 / 3.0 - u2 * (2.0 / 15.0))), t)
    return tl.where(u < 0, -t, t)


@triton.jit
def _sigmoid(u):
    """``1/(1+exp(-u))``; exp overflowing to inf gives the right limit 0."""
    return 1.0 / (1.0 + tl.exp(-u))


@triton.jit
def activate(u, ACT: tl.constexpr):
    """φ(u): 0 identity, 1 tanh, 2 relu, 3 sigmoid."""
    if ACT == 1:
        return _tanh(u)
    elif ACT == 2:
        return tl.where(u > 0, u, 0.0)
    elif ACT == 3:
        return _sigmoid(u)
    else:
        return u


@triton.jit
def activate_grad(u, ACT: tl.constexpr):
    """φ'(u); relu'(0) = 0 as in torch."""
    if ACT == 1:
        t = _tanh(u)
        return 1.0 - t * t
    elif ACT == 2:
        return tl.where(u > 0, 1.0, 0.0).to(u.dtype)
    elif ACT == 3:
        sg = _sigmoid(u)
        return sg * (1.0 - sg)
    else:
        return tl.full(u.shape, 1.0, u.dtype)


def k_block(K: int) -> int:
    """Offsets per loop iteration: 1 on GPU (registers), all in the interpreter."""
    return min(triton.next_power_of_2(K), 64) if INTERPRET else 1
