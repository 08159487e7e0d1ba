"""Triton kernels for the plasticity family (SPEC §3–§4) and their launchers.

The fused step :func:`plasticity_` reads and writes ``w`` exactly once, in
``_plasticity_kernel``; two small per-cell kernels go before and after it:

- ``_cell_stencil_kernel`` (only with competition): the inhibited activity
  ``y'[b,i] = relu(y[b,i] − β·mean_k y[b,nbr(i,k)])`` into an fp32 (fp64)
  scratch, since the winners of the main kernel need ``y'`` of neighbours, whose
  inhibition needs *their* neighbours. The same kernel serves
  :func:`lateral_inhibition` and, in its winner mode, :func:`local_winners`.
- ``_plasticity_kernel``: a program owns ``BLOCK_X`` cells of one lattice row
  and all ``K`` offsets of them, a ``[K_PAD, BLOCK_X]`` tile of ``w``. It loops
  over the batch, loading per sample the cells' own ``y'``, ``z``, traces and
  gate and the neighbour fields ``y'[nbr]``, ``z[nbr]``, ``x_pre[nbr]`` (one
  gather each, served from cache), forms the winners from ``y'`` and its
  neighbours, and accumulates the three batch sums that Δw needs, then forms
  Δw, the Σ|w| normalisation and the clamp, and stores the live synapses.
- ``_cell_state_kernel``: the traces and θ, after every ``w`` program has read
  the old traces of its neighbours.

Δw per live synapse (``g = win·gate``, ``j = nbr(i,k)``, ``z`` the spikes or ``y' > θ_act``)::

    Δw[k,i] = lr[i]/B · ( a₊·F₊(w)·Σ_b g_b[i]·z_b[i]·x_pre_b[j]·d₊
                        − a₋·F₋(w)·Σ_b g_b[i]·x_post_b[i]·d₋·z_b[j]
                        + η_bcm·Σ_b g_b[i]·y'_b[i]·(y'_b[i] − θ[i])·y'_b[j]
                        − ε·w·Σ_b g_b[i] )

F depends on ``w`` alone, so a program keeps the three batch sums as
``[K_PAD, BLOCK_X]`` accumulators and applies F once. Live synapse: not masked
and its neighbour inside the lattice; every other synapse is left unwritten.

Precision (STYLE rule 5): fp16/bf16/fp32 loaded and accumulated in fp32, fp64
when ``w`` or the state is fp64; results cast back to each tensor's dtype.
Addresses are int64. Under ``TRITON_INTERPRET=1`` tiles stay small (tiny test
lattices still cross tile edges).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import new_output
from ...contract import accumulation_dtype
from ...stencil import Geometry
from .tiles import INTERPRET, TILE_TUNING, TL_ACC, configs, mask_u8, on_device, stencil_tile, tile_grid


@triton.jit
def _synapse_tile(p_off, p_w, p_mask, D, H, W, K, PZ: tl.constexpr, PY: tl.constexpr, PX: tl.constexpr,
                  HAS_MASK: tl.constexpr, ACC: tl.constexpr, K_PAD: tl.constexpr, BLOCK_X: tl.constexpr):
    """This program's ``[K_PAD, BLOCK_X]`` tile of synapses (the cells of one row
    segment, all offsets): the cells, the neighbour addresses, the addresses in
    ``w``, which synapses are live (neighbour inside, not masked) and their ``w``."""
    x, m_x, kk, m_k, p_nbr, m_kx, N, p_i = stencil_tile(p_off, D, H, W, K, PZ, PY, PX, K_PAD, BLOCK_X)
    p_kx = kk[:, None].to(tl.int64) * N + p_i[None, :]
    live = m_kx
    if HAS_MASK:
        live = live & (tl.load(p_mask + p_kx, mask=m_kx, other=0) != 0)
    b_w = tl.load(p_w + p_kx, mask=live, other=0.0).to(ACC)
    return x, m_x, kk, m_k, p_nbr, m_kx, N, p_i, p_kx, live, b_w


@triton.autotune(key=["D", "H", "W", "K", "WINNERS"], **TILE_TUNING)
@triton.jit
def _cell_stencil_kernel(
    p_y, p_off, p_out,
    beta: tl.float64, threshold: tl.float64,
    B, D, H, W, K,
    PZ: tl.constexpr, PY: tl.constexpr, PX: tl.constexpr,
    WINNERS: tl.constexpr, ACC: tl.constexpr, K_PAD: tl.constexpr, BLOCK_X: tl.constexpr,
):
    """Per sample and cell, from ``y`` and its ``K`` neighbours (0 outside a zero boundary):

    WINNERS False: ``y'[b,i] = relu(y[b,i] − β·mean_k y[b,nbr(i,k)])``;
    WINNERS True:  ``win[b,i] = y[b,i] > θ_act and y[b,i] ≥ max_k y[b,nbr(i,k)]`` (0/1).
    """
    x, m_x, kk, m_k, p_nbr, m_kx, N, p_i = stencil_tile(p_off, D, H, W, K, PZ, PY, PX, K_PAD, BLOCK_X)
    for b in range(B):
        p_b = b * N
        b_y = tl.load(p_y + p_b + p_i, mask=m_x, other=0.0).to(ACC)
        b_yn = tl.load(p_y + p_b + p_nbr, mask=m_kx, other=0.0).to(ACC)
        if WINNERS:
            b_max = tl.max(tl.where(m_k[:, None], b_yn, float("-inf")), axis=0)
            thr = tl.full([], threshold, ACC)
            b_out = ((b_y > thr) & (b_y >= b_max)).to(tl.uint8)
        else:
            b_mean = tl.sum(b_yn, axis=0) / tl.full([], K, ACC)
            b_out = b_y - tl.full([], beta, ACC) * b_mean
            b_out = tl.where(b_out > 0, b_out, 0.0)
        tl.store(p_out + p_b + p_i, b_out.to(p_out.dtype.element_ty), mask=m_x)


@triton.autotune(
    key=["D", "H", "W", "K", "HAS_MASK", "HAS_Y", "HAS_SPIKES", "HAS_GATE", "HAS_LR", "STDP", "BCM", "COMPETITION",
         "NORMALIZE", "MULTIPLICATIVE"],
    restore_value=["p_w"],  # in place: each timed config must start from the same w
    **TILE_TUNING,
)
@triton.jit
def _plasticity_kernel(
    p_w, p_mask, p_off, p_yp, p_spk, p_xpre, p_xpost, p_theta, p_gate, p_lr,
    a_plus: tl.float64, a_minus: tl.float64, decay_pre: tl.float64, decay_post: tl.float64,
    bcm_lr: tl.float64, bcm_decay: tl.float64, threshold: tl.float64, w_min: tl.float64, w_max: tl.float64,
    B, D, H, W, K,
    PZ: tl.constexpr, PY: tl.constexpr, PX: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_Y: tl.constexpr, HAS_SPIKES: tl.constexpr, HAS_GATE: tl.constexpr,
    HAS_LR: tl.constexpr, STDP: tl.constexpr, BCM: tl.constexpr, COMPETITION: tl.constexpr,
    NORMALIZE: tl.constexpr, MULTIPLICATIVE: tl.constexpr,
    ACC: tl.constexpr, K_PAD: tl.constexpr, BLOCK_X: tl.constexpr,
):
    """One read and one write of ``w``: for each live synapse ``(k, i)``, ``j = nbr(i,k)``,

    ``Δw = lr[i]/B · Σ_b g_b[i]·(a₊F₊(w)·z_b[i]·x_pre_b[j]d₊ − a₋F₋(w)·z_b[j]·x_post_b[i]d₋
    + η_bcm·y'_b[i](y'_b[i] − θ[i])·y'_b[j] − ε·w)``, ``g = win·gate``;
    then ``w' = w + Δw`` scaled per cell by ``Σ_k|w| / Σ_k|w'|`` (NORMALIZE, cells
    with a winning sample and ``Σ_k|w'| > 0``) and clamped to ``[w_min, w_max]``.
    ``p_yp`` holds ``y'`` (the inhibited scratch under COMPETITION, else ``y``).
    """
    x, m_x, kk, m_k, p_nbr, m_kx, N, p_i, p_kx, live, b_w = _synapse_tile(
        p_off, p_w, p_mask, D, H, W, K, PZ, PY, PX, HAS_MASK, ACC, K_PAD, BLOCK_X)

    thr = tl.full([], threshold, ACC)
    b_gsum = tl.zeros([BLOCK_X], dtype=ACC)
    b_won = tl.zeros([BLOCK_X], dtype=tl.int32)
    if STDP:
        d_pre = tl.full([], decay_pre, ACC)
        d_post = tl.full([], decay_post, ACC)
        b_ltp = tl.zeros([K_PAD, BLOCK_X], dtype=ACC)
        b_ltd = tl.zeros([K_PAD, BLOCK_X], dtype=ACC)
    if BCM:
        b_theta = tl.load(p_theta + p_i, mask=m_x, other=0.0).to(ACC)
        b_hebb = tl.zeros([K_PAD, BLOCK_X], dtype=ACC)
    for b in range(B):
        p_b = b * N
        if HAS_Y:
            b_yi = tl.load(p_yp + p_b + p_i, mask=m_x, other=0.0).to(ACC)
            b_yn = tl.load(p_yp + p_b + p_nbr, mask=m_kx, other=0.0).to(ACC)
        b_g = tl.full([BLOCK_X], 1.0, ACC)
        if COMPETITION:
            b_max = tl.max(tl.where(m_k[:, None], b_yn, float("-inf")), axis=0)
            b_g = tl.where((b_yi > thr) & (b_yi >= b_max), b_g, 0.0)
        if HAS_GATE:
            b_g = b_g * tl.load(p_gate + p_b + p_i, mask=m_x, other=0.0).to(ACC)
        b_won = tl.maximum(b_won, (b_g > 0).to(tl.int32))
        b_gsum += b_g
        if STDP:
            if HAS_SPIKES:
                b_zi = tl.load(p_spk + p_b + p_i, mask=m_x, other=0.0).to(ACC)
                b_zn = tl.load(p_spk + p_b + p_nbr, mask=m_kx, other=0.0).to(ACC)
            else:
                b_zi = tl.where(b_yi > thr, 1.0, 0.0).to(ACC)
                b_zn = tl.where(b_yn > thr, 1.0, 0.0).to(ACC)
            b_xpre = tl.load(p_xpre + p_b + p_nbr, mask=m_kx, other=0.0).to(ACC) * d_pre
            b_xpost = tl.load(p_xpost + p_b + p_i, mask=m_x, other=0.0).to(ACC) * d_post
            b_ltp += (b_g * b_zi)[None, :] * b_xpre
            b_ltd += (b_g * b_xpost)[None, :] * b_zn
        if BCM:
            b_hebb += (b_g * b_yi * (b_yi - b_theta))[None, :] * b_yn

    b_dw = tl.zeros([K_PAD, BLOCK_X], dtype=ACC)
    if STDP:
        if MULTIPLICATIVE:
            b_dw += tl.full([], a_plus, ACC) * (tl.full([], w_max, ACC) - b_w) * b_ltp
            b_dw -= tl.full([], a_minus, ACC) * (b_w - tl.full([], w_min, ACC)) * b_ltd
        else:
            b_dw += tl.full([], a_plus, ACC) * b_ltp - tl.full([], a_minus, ACC) * b_ltd
    if BCM:
        b_dw += tl.full([], bcm_lr, ACC) * b_hebb - tl.full([], bcm_decay, ACC) * b_w * b_gsum[None, :]
    b_dw = b_dw / tl.full([], B, ACC)
    if HAS_LR:
        b_dw = b_dw * tl.load(p_lr + p_i, mask=m_x, other=0.0).to(ACC)[None, :]
    b_new = b_w + b_dw
    if NORMALIZE:
        b_before = tl.sum(tl.where(live, tl.abs(b_w), 0.0), axis=0)
        b_after = tl.sum(tl.where(live, tl.abs(b_new), 0.0), axis=0)
        ok = (b_won > 0) & (b_after > 0)
        b_scale = tl.where(ok, b_before / tl.where(ok, b_after, 1.0), 1.0)
        b_new = b_new * b_scale[None, :]
    b_new = tl.minimum(tl.maximum(b_new, tl.full([], w_min, ACC)), tl.full([], w_max, ACC))
    tl.store(p_w + p_kx, b_new.to(p_w.dtype.element_ty), mask=live)


@triton.autotune(configs=configs(), key=["HAS_SPIKES", "STDP", "BCM"],
                 restore_value=["p_xpre", "p_xpost", "p_theta"])
@triton.jit
def _cell_state_kernel(
    p_yp, p_spk, p_xpre, p_xpost, p_theta,
    decay_pre: tl.float64, decay_post: tl.float64, threshold: tl.float64,
    tau_theta: tl.float64, theta_min: tl.float64, theta_max: tl.float64,
    B, N,
    HAS_SPIKES: tl.constexpr, STDP: tl.constexpr, BCM: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """After Δw: ``x_pre ← x_pre·d₊ + z``, ``x_post ← x_post·d₋ + z`` (STDP);
    ``θ ← clamp(θ + (mean_b y'² − θ)/τ_θ, θ_min, θ_max)`` (BCM)."""
    p_i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m_i = p_i < N
    n64 = tl.cast(N, tl.int64)
    thr = tl.full([], threshold, ACC)
    b_y2 = tl.zeros([BLOCK], dtype=ACC)
    for b in range(B):
        p_bi = b * n64 + p_i
        if (STDP and not HAS_SPIKES) or BCM:
            b_y = tl.load(p_yp + p_bi, mask=m_i, other=0.0).to(ACC)
        if BCM:
            b_y2 += b_y * b_y
        if STDP:
            if HAS_SPIKES:
                b_z = tl.load(p_spk + p_bi, mask=m_i, other=0.0).to(ACC)
            else:
                b_z = tl.where(b_y > thr, 1.0, 0.0).to(ACC)
            b_xpre = tl.load(p_xpre + p_bi, mask=m_i, other=0.0).to(ACC) * tl.full([], decay_pre, ACC) + b_z
            b_xpost = tl.load(p_xpost + p_bi, mask=m_i, other=0.0).to(ACC) * tl.full([], decay_post, ACC) + b_z
            tl.store(p_xpre + p_bi, b_xpre.to(p_xpre.dtype.element_ty), mask=m_i)
            tl.store(p_xpost + p_bi, b_xpost.to(p_xpost.dtype.element_ty), mask=m_i)
    if BCM:
        b_theta = tl.load(p_theta + p_i, mask=m_i, other=0.0).to(ACC)
        b_theta = b_theta + (b_y2 / tl.full([], B, ACC) - b_theta) / tl.full([], tau_theta, ACC)
        b_theta = tl.minimum(tl.maximum(b_theta, tl.full([], theta_min, ACC)), tl.full([], theta_max, ACC))
        tl.store(p_theta + p_i, b_theta.to(p_theta.dtype.element_ty), mask=m_i)


@triton.autotune(key=["D", "H", "W", "K", "HAS_MASK", "HAS_WHERE"], restore_value=["p_w"], **TILE_TUNING)
@triton.jit
def _normalize_kernel(
    p_w, p_mask, p_off, p_target, p_where,
    D, H, W, K,
    PZ: tl.constexpr, PY: tl.constexpr, PX: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_WHERE: tl.constexpr, ACC: tl.constexpr, K_PAD: tl.constexpr, BLOCK_X: tl.constexpr,
):
    """``w[k,i] ← w[k,i]·target[i]/Σ_k|w[k,i]|`` on live synapses, for cells with
    ``Σ_k|w| > 0`` (and ``where[i]``)."""
    x, m_x, kk, m_k, p_nbr, m_kx, N, p_i, p_kx, live, b_w = _synapse_tile(
        p_off, p_w, p_mask, D, H, W, K, PZ, PY, PX, HAS_MASK, ACC, K_PAD, BLOCK_X)
    b_total = tl.sum(tl.abs(b_w), axis=0)
    ok = b_total > 0
    if HAS_WHERE:
        ok = ok & (tl.load(p_where + p_i, mask=m_x, other=0) != 0)
    b_target = tl.load(p_target + p_i, mask=m_x, other=0.0).to(ACC)
    b_scale = tl.where(ok, b_target / tl.where(ok, b_total, 1.0), 1.0)
    tl.store(p_w + p_kx, (b_w * b_scale[None, :]).to(p_w.dtype.element_ty), mask=live)


def _readable(t):
    """A bool per-cell tensor as uint8 (Triton loads it as 0/1); others as they are."""
    return t.view(torch.uint8) if t is not None and t.dtype == torch.bool else t


def _cell_stencil(y, geom: Geometry, out, acc_t, beta: float, threshold: float, winners: bool):
    B, D, H, W = y.shape
    _cell_stencil_kernel[tile_grid(D, H, W)](
        y, geom.offsets_on(y.device, torch.int32), out,
        float(beta), float(threshold), B, D, H, W, geom.K,
        PZ=geom.periodic[0], PY=geom.periodic[1], PX=geom.periodic[2],
        WINNERS=winners, ACC=TL_ACC[acc_t], K_PAD=triton.next_power_of_2(geom.K),
    )
    return out


def lateral_inhibition(y, beta: float, geom: Geometry):
    """``y'[b,i] = relu(y[b,i] − β·mean_k y[b,nbr(i,k)])`` in the dtype of ``y``
    (0 for neighbours outside a zero boundary)."""
    out = new_output(y.shape, y.dtype, y.device)
    with on_device(y):
        return _cell_stencil(y, geom, out, accumulation_dtype(y.dtype), beta, 0.0, False)


def local_winners(y, threshold: float, geom: Geometry):
    """``win[b,i] = y[b,i] > θ_act and y[b,i] ≥ max_k y[b,nbr(i,k)]``, bool ``[B, D, H, W]``."""
    out = new_output(y.shape, torch.bool, y.device)
    with on_device(y):
        _cell_stencil(y, geom, out.view(torch.uint8), accumulation_dtype(y.dtype), 0.0, threshold, True)
    return out


def plasticity_(w, mask, geom: Geometry, p, y, spikes, x_pre, x_post, theta, gate, lr):
    """The fused plasticity step of SPEC §4 (see :func:`cellkern.backends.reference.plasticity_`),
    in place on ``w``, the traces and θ: at most three launches — inhibition into
    a scratch (with competition), the single pass over ``w``, then traces and θ."""
    K, D, H, W = w.shape
    state_dtype = next(t.dtype for t in (y, spikes, x_pre, theta) if t is not None)
    acc_t = torch.float64 if torch.float64 in (w.dtype, state_dtype) else torch.float32
    B = (y if y is not None else spikes).shape[0]
    spikes, gate = _readable(spikes), _readable(gate)
    need_y = p.competition or p.bcm or (p.stdp and spikes is None)
    with on_device(w):
        yp = y if need_y else None
        if need_y and p.competition:
            yp = _cell_stencil(y, geom, new_output(y.shape, acc_t, y.device), acc_t, p.beta, 0.0, False)
        m = mask_u8(mask)
        _plasticity_kernel[tile_grid(D, H, W)](
            w, m if m is not None else w, geom.offsets_on(w.device, torch.int32),
            *(t if t is not None else w for t in (yp, spikes, x_pre, x_post, theta, gate, lr)),
            float(p.a_plus), float(p.a_minus), float(p.decay_pre), float(p.decay_post),
            float(p.bcm_lr), float(p.bcm_decay), float(p.threshold), float(p.w_min), float(p.w_max),
            B, D, H, W, K,
            PZ=geom.periodic[0], PY=geom.periodic[1], PX=geom.periodic[2],
            HAS_MASK=m is not None, HAS_Y=yp is not None, HAS_SPIKES=spikes is not None,
            HAS_GATE=gate is not None, HAS_LR=lr is not None, STDP=bool(p.stdp), BCM=bool(p.bcm),
            COMPETITION=bool(p.competition), NORMALIZE=bool(p.normalize), MULTIPLICATIVE=bool(p.multiplicative),
            ACC=TL_ACC[acc_t], K_PAD=triton.next_power_of_2(K),
        )
        if p.stdp or p.bcm:
            n, block = D * H * W, (64 if INTERPRET else 1024)
            _cell_state_kernel[(triton.cdiv(n, block),)](
                *(t if t is not None else w for t in (yp, spikes, x_pre, x_post, theta)),
                float(p.decay_pre), float(p.decay_post), float(p.threshold),
                float(p.tau_theta), float(p.theta_min), float(p.theta_max),
                B, n, HAS_SPIKES=spikes is not None, STDP=bool(p.stdp), BCM=bool(p.bcm),
                ACC=TL_ACC[acc_t], BLOCK=block,
            )


def heterosynaptic_normalize_(w, mask, geom: Geometry, target, where):
    """Scale the live synapses of each cell (where ``where``, default all) so that
    ``Σ_k |w[k,i]| = target[i]``; cells whose live Σ|w| is 0 stay as they are."""
    K, D, H, W = w.shape
    acc_t = torch.float64 if torch.float64 in (w.dtype, target.dtype) else torch.float32
    m = mask_u8(mask)
    wh = _readable(where)
    with on_device(w):
        _normalize_kernel[tile_grid(D, H, W)](
            w, m if m is not None else w, geom.offsets_on(w.device, torch.int32), target,
            wh if wh is not None else target,
            D, H, W, K,
            PZ=geom.periodic[0], PY=geom.periodic[1], PX=geom.periodic[2],
            HAS_MASK=m is not None, HAS_WHERE=wh is not None, ACC=TL_ACC[acc_t],
            K_PAD=triton.next_power_of_2(K),
        )
