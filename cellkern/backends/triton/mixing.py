"""Triton kernels for the mixing form (SPEC §11) and their launchers.

``W`` is ``[K, C_out, C_in, D, H, W]``; ``W[k,o,c,i]`` carries channel ``c`` of
``nbr(i,k)`` into channel ``o`` of cell ``i``. Five kernels:

- ``_mixing_fwd_kernel``: ``a[b,o,i] = Σ_k m[k,i]·Σ_c W[k,o,c,i]·s[b,c,nbr(i,k)]``
  with the ``propagate`` epilogue fused (``u = a + x + bias``,
  ``s' = (1-α)·s + α·φ(u)``, ``triangle`` included: the program holds all
  ``C_out`` channels of its cells);
- ``_mixing_bwd_kernel``: the transposed stencil, a gather at ``−o_k``:
  ``ds[b,c,j] = r·res[b,c,j] + Σ_k m[k,j−o_k]·Σ_o W[k,o,c,j−o_k]·g[b,o,j−o_k]``;
- ``_mixing_weight_grad_kernel``: ``dW[k,o,c,i] = m[k,i]·Σ_b g[b,o,i]·s[b,c,nbr(i,k)]``,
  one program per ``(o, cell block)``, no atomics;
- ``_mixing_du_kernel``: ``du = α·gᵀ·∂φ/∂u`` per cell (all channels, for ``triangle``);
- the competitive Hebbian step: ``u`` by the forward kernel, then
  ``_hebbian_winners_kernel`` (``p``, ``Σ_b p·u``, ``η/n``, and ``β`` in place)
  and ``_hebbian_update_kernel`` (``W += η/n·(Σ_b p·s_nbr − Σ_b p·u·W)`` on live
  synapses). ``W`` is read twice (for ``u`` and for the update) and written once.

Grid: axis 0 is ``b`` (or ``o`` for the weight kernels), axis 1 a block of
``BLOCK_N`` consecutive cells (``z, y, x`` from the linear index). Each
program loops over ``k`` (``K_BLOCK`` offsets at a time: 1 on GPU, all of them
under ``TRITON_INTERPRET=1``, whose cost is per operation, not per element) and
over the contracted channel at run time. Addresses are int64.

Precision (STYLE rule 5): inputs are loaded and summed in fp32 (fp64 stays
fp64), results cast back to the dtype of ``s`` (``dW`` and ``W`` to that of ``w``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...contract import ACTIVATION_CODES, accumulation_dtype
from ...stencil import Geometry
from .. import new_output
from .propagate import _TL_ACC, _activate, _activate_grad, _k_block, _mask_u8, _neighbour, _on

__all__ = ["MIXING", "mixing_aggregate_forward", "mixing_aggregate_backward", "mixing_propagate_forward",
           "mixing_propagate_backward", "competitive_hebbian_"]

#: this backend has the mixing-form functions (see ``cellkern/backends/__init__.py``)
MIXING = True
if ACTIVATION_CODES["triangle"] != 4:  # the kernels below test ACT == 4
    raise ImportError("cellkern.contract changed the triangle activation code; update triton/mixing.py")


@triton.jit
def _cell_tile(D, H, W, BLOCK_N: tl.constexpr):
    """Axis 0 is ``outer`` (b or o), axis 1 the block of ``BLOCK_N`` consecutive
    cells: returns ``outer, z, y, x, m_n, N, p_i`` (``p_i`` the cells' index)."""
    outer = tl.program_id(0).to(tl.int64)
    N = tl.cast(D, tl.int64) * H * W
    p_i = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = p_i < N
    x = p_i % W
    y = (p_i // W) % H
    z = p_i // (H * W)
    return outer, z, y, x, m_n, N, p_i


@triton.jit
def _offset_block(p_off, p_mask, k0, z, y, x, m_n, p_i, N, D, H, W, K: tl.constexpr,
                  PZ: tl.constexpr, PY: tl.constexpr, PX: tl.constexpr, HAS_MASK: tl.constexpr,
                  TRANSPOSED: tl.constexpr, K_BLOCK: tl.constexpr):
    """Offsets ``k0 … k0+K_BLOCK−1`` at the program's cells: ``k`` ``[K_BLOCK, 1]``, the
    int64 index ``[K_BLOCK, BLOCK_N]`` of ``i + o_k`` (``j − o_k`` when TRANSPOSED)
    and whether that synapse is live (inside a zero boundary, not masked; the mask
    is read at the post cell: ``i`` forward, ``j − o_k`` transposed)."""
    k = k0 + tl.arange(0, K_BLOCK)
    m_k = k < K
    dz = tl.load(p_off + 3 * k, mask=m_k, other=0)
    dy = tl.load(p_off + 3 * k + 1, mask=m_k, other=0)
    dx = tl.load(p_off + 3 * k + 2, mask=m_k, other=0)
    if TRANSPOSED:
        dz, dy, dx = -dz, -dy, -dx
    zz, ok_z = _neighbour(z[None, :], dz[:, None], D, PZ)
    yy, ok_y = _neighbour(y[None, :], dy[:, None], H, PY)
    xx, ok_x = _neighbour(x[None, :], dx[:, None], W, PX)
    live = m_k[:, None] & ok_z & ok_y & ok_x & m_n[None, :]
    p_nbr = (zz * H + yy) * W + xx
    k64 = k[:, None].to(tl.int64)
    if HAS_MASK:
        p_post = p_nbr if TRANSPOSED else p_i[None, :]
        live = live & (tl.load(p_mask + k64 * N + p_post, mask=live, other=0) != 0)
    return k64, p_nbr, live


@triton.jit
def _mixing_gather(p_src, p_w, p_mask, p_off, outer, z, y, x, m_n, p_i, N, C_SUM, C_OUT, C_IN, D, H, W,
                   K: tl.constexpr, PZ: tl.constexpr, PY: tl.constexpr, PX: tl.constexpr,
                   HAS_MASK: tl.constexpr, TRANSPOSED: tl.constexpr, ACC: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, K_BLOCK: tl.constexpr):
    """The ``[BLOCK_R, BLOCK_N]`` tile of sample ``outer``:

    forward, ``r = o``: ``Σ_k m[k,i]·Σ_c W[k,o,c,i]·src[b,c,i+o_k]``;
    transposed, ``r = c``: ``Σ_k m[k,j−o_k]·Σ_o W[k,o,c,j−o_k]·src[b,o,j−o_k]``.
    ``C_SUM`` is the contracted channel count (``C_in`` forward, ``C_out`` transposed).
    """
    r = tl.arange(0, BLOCK_R)
    m_r = r < (C_IN if TRANSPOSED else C_OUT)
    b_acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=ACC)
    for k0 in tl.static_range(0, K, K_BLOCK):
        k64, p_nbr, live = _offset_block(p_off, p_mask, k0, z, y, x, m_n, p_i, N, D, H, W, K, PZ, PY, PX,
                                         HAS_MASK, TRANSPOSED, K_BLOCK)
        m_w = live[:, None, :] & m_r[None, :, None]
        for q in range(C_SUM):
            b_src = tl.load(p_src + (outer * C_SUM + q) * N + p_nbr, mask=live, other=0.0).to(ACC)
            if TRANSPOSED:  # W[k, q=o, r=c, j−o_k]
                p_wq = ((k64[:, :, None] * C_OUT + q) * C_IN + r[None, :, None]) * N + p_nbr[:, None, :]
            else:  # W[k, r=o, q=c, i]
                p_wq = ((k64[:, :, None] * C_OUT + r[None, :, None]) * C_IN + q) * N + p_i[None, None, :]
            b_w = tl.load(p_w + p_wq, mask=m_w, other=0.0).to(ACC)
            b_acc += tl.sum(b_w * b_src[:, None, :], axis=0)
    return b_acc


@triton.jit
def _channel_activate(u, m_r, C, ACT: tl.constexpr):
    """φ(u) of a ``[channels, cells]`` tile; ``triangle``: ``relu(u[o] − mean_c u[c])``."""
    if ACT == 4:  # triangle
        mean = tl.sum(tl.where(m_r[:, None], u, 0.0), axis=0) / C
        d = u - mean[None, :]
        return tl.where(d > 0, d, 0.0)
    else:
        return _activate(u, ACT)


@triton.jit
def _mixing_fwd_kernel(
    p_s, p_w, p_mask, p_off, p_x, p_bias, p_out, p_u,
    leak: tl.float64,
    C_OUT, C_IN, D, H, W, K: tl.constexpr,
    PZ: tl.constexpr, PY: tl.constexpr, PX: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_X: tl.constexpr, HAS_BIAS: tl.constexpr,
    EPILOGUE: tl.constexpr, ACT: tl.constexpr, SAVE_U: tl.constexpr, ACC: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_N: tl.constexpr, K_BLOCK: tl.constexpr,
):
    """``a[b,o,i] = Σ_k m[k,i]·Σ_c W[k,o,c,i]·s[b,c,nbr(i,k)]``.

    EPILOGUE 0 stores ``a``; EPILOGUE 1 (``C_out = C_in``) stores
    ``s' = (1-α)·s + α·φ(u)`` with ``u = a + x + bias`` (and ``u`` when SAVE_U).
    """
    b, z, y, x, m_n, N, p_i = _cell_tile(D, H, W, BLOCK_N)
    b_acc = _mixing_gather(p_s, p_w, p_mask, p_off, b, z, y, x, m_n, p_i, N, C_IN, C_OUT, C_IN, D, H, W, K,
                           PZ, PY, PX, HAS_MASK, False, ACC, BLOCK_O, BLOCK_N, K_BLOCK)
    o = tl.arange(0, BLOCK_O)
    m_o = o < C_OUT
    p_bo = (b * C_OUT + o[:, None]) * N + p_i[None, :]
    m_ox = m_o[:, None] & m_n[None, :]
    if EPILOGUE == 0:
        tl.store(p_out + p_bo, b_acc.to(p_out.dtype.element_ty), mask=m_ox)
    else:
        b_u = b_acc
        if HAS_X:
            b_u += tl.load(p_x + p_bo, mask=m_ox, other=0.0).to(ACC)
        if HAS_BIAS:
            b_u += tl.load(p_bias + o[:, None] * N + p_i[None, :], mask=m_ox, other=0.0).to(ACC)
        if SAVE_U:
            tl.store(p_u + p_bo, b_u, mask=m_ox)
        a = tl.full([], leak, ACC)
        b_c = tl.load(p_s + p_bo, mask=m_ox, other=0.0).to(ACC)
        b_out = (1.0 - a) * b_c + a * _channel_activate(b_u, m_o, C_OUT, ACT)
        tl.store(p_out + p_bo, b_out.to(p_out.dtype.element_ty), mask=m_ox)


@triton.jit
def _mixing_bwd_kernel(
    p_g, p_w, p_mask, p_off, p_res, p_out,
    res_coef: tl.float64,
    C_OUT, C_IN, D, H, W, K: tl.constexpr,
    PZ: tl.constexpr, PY: tl.constexpr, PX: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_RES: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, K_BLOCK: tl.constexpr,
):
    """``ds[b,c,j] = r·res[b,c,j] + Σ_k m[k,j−o_k]·Σ_o W[k,o,c,j−o_k]·g[b,o,j−o_k]``
    (the residual serves propagate: ``r = 1−α``, ``res = g``)."""
    b, z, y, x, m_n, N, p_j = _cell_tile(D, H, W, BLOCK_N)
    b_acc = _mixing_gather(p_g, p_w, p_mask, p_off, b, z, y, x, m_n, p_j, N, C_OUT, C_OUT, C_IN, D, H, W, K,
                           PZ, PY, PX, HAS_MASK, True, ACC, BLOCK_C, BLOCK_N, K_BLOCK)
    c = tl.arange(0, BLOCK_C)
    p_bc = (b * C_IN + c[:, None]) * N + p_j[None, :]
    m_cx = (c < C_IN)[:, None] & m_n[None, :]
    if HAS_RES:
        b_acc += tl.full([], res_coef, ACC) * tl.load(p_res + p_bc, mask=m_cx, other=0.0).to(ACC)
    tl.store(p_out + p_bc, b_acc.to(p_out.dtype.element_ty), mask=m_cx)


@triton.jit
def _mixing_weight_grad_kernel(
    p_g, p_s, p_mask, p_off, p_dw,
    B, C_OUT, C_IN, D, H, W, K: tl.constexpr,
    PZ: tl.constexpr, PY: tl.constexpr, PX: tl.constexpr,
    HAS_MASK: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, K_BLOCK: tl.constexpr,
):
    """``dW[k,o,c,i] = m[k,i]·Σ_b g[b,o,i]·s[b,c,nbr(i,k)]`` (0 where not live) for
    the program's ``o`` and cells, every ``k`` and ``c``."""
    o, z, y, x, m_n, N, p_i = _cell_tile(D, H, W, BLOCK_N)
    c = tl.arange(0, BLOCK_C)
    m_c = c < C_IN
    for k0 in tl.static_range(0, K, K_BLOCK):
        k64, p_nbr, live = _offset_block(p_off, p_mask, k0, z, y, x, m_n, p_i, N, D, H, W, K, PZ, PY, PX,
                                         HAS_MASK, False, K_BLOCK)
        m_kc = live[:, None, :] & m_c[None, :, None]
        b_acc = tl.zeros([K_BLOCK, BLOCK_C, BLOCK_N], dtype=ACC)
        for b in range(B):
            b_g = tl.load(p_g + (b * C_OUT + o) * N + p_i, mask=m_n, other=0.0).to(ACC)
            p_sb = (b * C_IN + c[None, :, None]) * N + p_nbr[:, None, :]
            b_s = tl.load(p_s + p_sb, mask=m_kc, other=0.0).to(ACC)
            b_acc += b_s * b_g[None, None, :]
        p_k = ((k64[:, :, None] * C_OUT + o) * C_IN + c[None, :, None]) * N + p_i[None, None, :]
        m_st = (k64 < K)[:, :, None] & m_c[None, :, None] & m_n[None, None, :]
        tl.store(p_dw + p_k, tl.where(m_kc, b_acc, 0.0).to(p_dw.dtype.element_ty), mask=m_st)


@triton.jit
def _mixing_du_kernel(p_g, p_u, p_du, leak: tl.float64, C, D, H, W, ACT: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """``du = α·gᵀ·∂φ/∂u``: ``g·α·φ'(u)``, or for ``triangle``
    ``α·(r[c]·g[c] − mean_o r[o]·g[o])`` with ``r = (u > mean_c u)``."""
    b, z, y, x, m_n, N, p_i = _cell_tile(D, H, W, BLOCK_N)
    c = tl.arange(0, BLOCK_C)
    m_c = c < C
    p_bc = (b * C + c[:, None]) * N + p_i[None, :]
    m_cx = m_c[:, None] & m_n[None, :]
    b_g = tl.load(p_g + p_bc, mask=m_cx, other=0.0).to(ACC)
    b_u = tl.load(p_u + p_bc, mask=m_cx, other=0.0).to(ACC)
    a = tl.full([], leak, ACC)
    if ACT == 4:
        mean = tl.sum(tl.where(m_c[:, None], b_u, 0.0), axis=0) / C
        rg = tl.where(b_u > mean[None, :], b_g, 0.0)
        rg = tl.where(m_c[:, None], rg, 0.0)
        b_du = a * (rg - (tl.sum(rg, axis=0) / C)[None, :])
    else:
        b_du = a * b_g * _activate_grad(b_u, ACT)
    tl.store(p_du + p_bc, b_du, mask=m_cx)


@triton.jit
def _hebbian_winners_kernel(
    p_u, p_beta, p_p, p_coef, p_pu,
    eta: tl.float64, inv_tau: tl.float64, eta_beta: tl.float64,
    B, C_OUT, D, H, W,
    HARD: tl.constexpr, WINS: tl.constexpr, ACC: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Per cell: ``p[b,o] = softmax_o((u[b,o] + β[o])/τ)`` (HARD: the one-hot of the
    first argmax), ``pu[o] = Σ_b p·u``, ``coef[o] = η/n[o]`` (``n = 1 + Σ_b p`` when
    WINS, else B), then ``β[o] −= η_β·(mean_b p[b,o] − 1/C_out)`` in place."""
    _, z, y, x, m_n, N, p_i = _cell_tile(D, H, W, BLOCK_N)
    o = tl.arange(0, BLOCK_O)
    m_o = o < C_OUT
    m_ox = m_o[:, None] & m_n[None, :]
    p_oi = o[:, None] * N + p_i[None, :]
    b_beta = tl.load(p_beta + p_oi, mask=m_ox, other=0.0)
    b_sp = tl.zeros([BLOCK_O, BLOCK_N], dtype=ACC)
    b_spu = tl.zeros([BLOCK_O, BLOCK_N], dtype=ACC)
    for b in range(B):
        p_bo = b * C_OUT * N + p_oi
        b_u = tl.load(p_u + p_bo, mask=m_ox, other=0.0).to(ACC)
        v = tl.where(m_o[:, None], b_u + b_beta.to(ACC), float("-inf"))
        v_max = tl.max(v, axis=0)
        if HARD:
            first = tl.min(tl.where(v == v_max[None, :], o[:, None], BLOCK_O), axis=0)
            b_p = tl.where(o[:, None] == first[None, :], 1.0, 0.0).to(ACC)
        else:
            e = tl.exp((v - v_max[None, :]) * tl.full([], inv_tau, ACC))  # an fp64 scalar would promote
            b_p = e / tl.sum(e, axis=0)[None, :]
        tl.store(p_p + p_bo, b_p, mask=m_ox)
        b_sp += b_p
        b_spu += b_p * b_u
    if WINS:
        n = 1.0 + b_sp
    else:
        n = tl.full([BLOCK_O, BLOCK_N], 1.0, ACC) * B
    tl.store(p_coef + p_oi, tl.full([], eta, ACC) / n, mask=m_ox)
    tl.store(p_pu + p_oi, b_spu, mask=m_ox)
    new_beta = b_beta - (tl.full([], eta_beta, ACC) * (b_sp / B - 1.0 / C_OUT)).to(b_beta.dtype)
    tl.store(p_beta + p_oi, new_beta, mask=m_ox)


@triton.jit
def _hebbian_update_kernel(
    p_w, p_s, p_p, p_coef, p_pu, p_mask, p_off,
    B, C_OUT, C_IN, D, H, W, K: tl.constexpr,
    PZ: tl.constexpr, PY: tl.constexpr, PX: tl.constexpr,
    HAS_MASK: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, K_BLOCK: tl.constexpr,
):
    """``W[k,o,c,i] += coef[o,i]·(Σ_b p[b,o,i]·s[b,c,nbr(i,k)] − pu[o,i]·W[k,o,c,i])`` on
    live synapses (others are not written), for the program's ``o`` and cells."""
    o, z, y, x, m_n, N, p_i = _cell_tile(D, H, W, BLOCK_N)
    c = tl.arange(0, BLOCK_C)
    m_c = c < C_IN
    b_coef = tl.load(p_coef + o * N + p_i, mask=m_n, other=0.0)
    b_pu = tl.load(p_pu + o * N + p_i, mask=m_n, other=0.0)
    for k0 in tl.static_range(0, K, K_BLOCK):
        k64, p_nbr, live = _offset_block(p_off, p_mask, k0, z, y, x, m_n, p_i, N, D, H, W, K, PZ, PY, PX,
                                         HAS_MASK, False, K_BLOCK)
        m_kc = live[:, None, :] & m_c[None, :, None]
        b_hebb = tl.zeros([K_BLOCK, BLOCK_C, BLOCK_N], dtype=ACC)
        for b in range(B):
            b_p = tl.load(p_p + (b * C_OUT + o) * N + p_i, mask=m_n, other=0.0)
            p_sb = (b * C_IN + c[None, :, None]) * N + p_nbr[:, None, :]
            b_hebb += tl.load(p_s + p_sb, mask=m_kc, other=0.0).to(ACC) * b_p[None, None, :]
        p_wk = ((k64[:, :, None] * C_OUT + o) * C_IN + c[None, :, None]) * N + p_i[None, None, :]
        b_w = tl.load(p_w + p_wk, mask=m_kc, other=0.0).to(ACC)
        b_new = b_w + b_coef[None, None, :] * (b_hebb - b_pu[None, None, :] * b_w)
        tl.store(p_w + p_wk, b_new.to(p_w.dtype.element_ty), mask=m_kc)


def _block_n(N: int) -> int:
    """Cells per program: 64 under the interpreter (whose cost is per program and
    operation; lattices of more than 64 cells still cross tile edges), 64 on GPU."""
    return min(triton.next_power_of_2(N), 64)


def _pad(C: int) -> int:
    return triton.next_power_of_2(C)


def _common(t, geom: Geometry, mask):
    """The launch arguments every stencil kernel shares (a pointer stands in for an absent mask)."""
    m = _mask_u8(mask)
    return dict(p_mask=m if m is not None else t, p_off=geom.offsets_on(t.device, torch.int32), K=geom.K,
                PZ=geom.periodic[0], PY=geom.periodic[1], PX=geom.periodic[2], HAS_MASK=m is not None,
                K_BLOCK=_k_block(geom.K))


def _forward(s, w, mask, x, bias, geom: Geometry, leak: float, act: int, epilogue: int, save_u: bool,
             out_dtype=None):
    B, C_in, D, H, W = s.shape
    C_out = w.shape[1]
    acc_t = accumulation_dtype(s.dtype)
    out = new_output((B, C_out, D, H, W), out_dtype or s.dtype, s.device)
    u = new_output(out.shape, acc_t, s.device) if save_u else None
    bn = _block_n(D * H * W)
    _mixing_fwd_kernel[(B, triton.cdiv(D * H * W, bn))](
        p_s=s, p_w=w, p_x=x if x is not None else s, p_bias=bias if bias is not None else s,
        p_out=out, p_u=u if u is not None else out, leak=float(leak), C_OUT=C_out, C_IN=C_in, D=D, H=H, W=W,
        HAS_X=x is not None, HAS_BIAS=bias is not None, EPILOGUE=epilogue, ACT=act, SAVE_U=save_u,
        ACC=_TL_ACC[acc_t], BLOCK_O=_pad(C_out), BLOCK_N=bn, **_common(s, geom, mask),
    )
    return out, u


def _transposed(g, w, mask, geom: Geometry, out_dtype, res=None, res_coef: float = 0.0):
    B, C_out, D, H, W = g.shape
    C_in = w.shape[2]
    out = new_output((B, C_in, D, H, W), out_dtype, g.device)
    bn = _block_n(D * H * W)
    _mixing_bwd_kernel[(B, triton.cdiv(D * H * W, bn))](
        p_g=g, p_w=w, p_res=res if res is not None else g, p_out=out, res_coef=float(res_coef),
        C_OUT=C_out, C_IN=C_in, D=D, H=H, W=W, HAS_RES=res is not None,
        ACC=_TL_ACC[accumulation_dtype(out_dtype)], BLOCK_C=_pad(C_in), BLOCK_N=bn, **_common(g, geom, mask),
    )
    return out


def _weight_grad(g, s, mask, geom: Geometry, w_dtype):
    B, C_in, D, H, W = s.shape
    C_out = g.shape[1]
    dw = new_output((geom.K, C_out, C_in, D, H, W), w_dtype, s.device)
    bn = _block_n(D * H * W)
    _mixing_weight_grad_kernel[(C_out, triton.cdiv(D * H * W, bn))](
        p_g=g, p_s=s, p_dw=dw, B=B, C_OUT=C_out, C_IN=C_in, D=D, H=H, W=W,
        ACC=_TL_ACC[accumulation_dtype(s.dtype)], BLOCK_C=_pad(C_in), BLOCK_N=bn, **_common(s, geom, mask),
    )
    return dw


def mixing_aggregate_forward(s, w, mask, geom: Geometry):
    """``a[b,o,i] = Σ_k m[k,i]·Σ_c W[k,o,c,i]·s[b,c,nbr(i,k)]``, ``[B, C_out, D, H, W]`` in the dtype of ``s``."""
    with _on(s):
        return _forward(s, w, mask, None, None, geom, 1.0, 0, 0, False)[0]


def mixing_aggregate_backward(g, s, w, mask, geom: Geometry, need_s: bool, need_w: bool):
    """``(ds, dw)`` of :func:`mixing_aggregate_forward`; None where not needed."""
    with _on(s):
        ds = _transposed(g, w, mask, geom, s.dtype) if need_s else None
        dw = _weight_grad(g, s, mask, geom, w.dtype) if need_w else None
    return ds, dw


def mixing_propagate_forward(s, w, mask, x, bias, geom: Geometry, leak: float, activation: str, save_u: bool):
    """``s' = (1-α)·s + α·φ(u)``, ``u = mixing_aggregate(s, W, mask) + x + bias``; one fused kernel.

    Returns ``(s', u)``, ``u`` (fp32, fp64 for fp64 input) only when ``save_u``.
    """
    with _on(s):
        return _forward(s, w, mask, x, bias, geom, leak, ACTIVATION_CODES[activation], 1, save_u)


def mixing_propagate_backward(g, s, w, mask, u, geom: Geometry, leak: float, activation: str,
                              need_s: bool, need_w: bool, need_u: bool):
    """``du = α·gᵀ·∂φ/∂u``; ``ds = (1-α)·g + transposed gather of du``; ``dW`` from ``du`` and ``s``."""
    B, C, D, H, W = u.shape
    bn = _block_n(D * H * W)
    with _on(s):
        du = new_output(u.shape, u.dtype, u.device)
        _mixing_du_kernel[(B, triton.cdiv(D * H * W, bn))](
            g, u, du, float(leak), C, D, H, W, ACT=ACTIVATION_CODES[activation], ACC=_TL_ACC[u.dtype],
            BLOCK_C=_pad(C), BLOCK_N=bn)
        ds = _transposed(du, w, mask, geom, s.dtype, res=g, res_coef=1.0 - leak) if need_s else None
        dw = _weight_grad(du, s, mask, geom, w.dtype) if need_w else None
    return ds, dw, (du if need_u else None)


def competitive_hebbian_(w, s, beta, mask, geom: Geometry, eta: float, tau: float, eta_beta: float, wins: bool):
    """The competitive Hebbian step of SPEC §11, in place on ``w`` and ``beta``
    (see :func:`cellkern.backends.reference.competitive_hebbian_`); ``tau == 0`` is hard WTA."""
    B, C_in, D, H, W = s.shape
    C_out = w.shape[1]
    acc_t = accumulation_dtype(s.dtype)  # the ops pair fp64 weights with fp64 states only
    bn = _block_n(D * H * W)
    with _on(s):
        u, _ = _forward(s, w, mask, None, None, geom, 1.0, 0, 0, False, out_dtype=acc_t)
        p = torch.empty_like(u)
        coef = torch.empty((C_out, D, H, W), dtype=acc_t, device=s.device)
        pu = torch.empty_like(coef)
        _hebbian_winners_kernel[(1, triton.cdiv(D * H * W, bn))](
            u, beta, p, coef, pu, float(eta), 0.0 if tau == 0 else 1.0 / float(tau), float(eta_beta),
            B, C_out, D, H, W, HARD=tau == 0, WINS=bool(wins), ACC=_TL_ACC[acc_t], BLOCK_O=_pad(C_out),
            BLOCK_N=bn)
        _hebbian_update_kernel[(C_out, triton.cdiv(D * H * W, bn))](
            p_w=w, p_s=s, p_p=p, p_coef=coef, p_pu=pu, B=B, C_OUT=C_out, C_IN=C_in, D=D, H=H, W=W,
            ACC=_TL_ACC[acc_t], BLOCK_C=_pad(C_in), BLOCK_N=bn, **_common(s, geom, mask))
