"""Triton kernels for lattice propagation (SPEC §2) and their launchers.

Three kernels do the work (plus an elementwise ``du`` when ``dw`` is not wanted):

- ``_gather_fwd_kernel``: ``a[b,c,i] = Σ_k m[k,i]·w[k,i]·s[b,c,nbr(i,k)]``,
  with the ``propagate`` epilogue fused (``u = a + x + bias``,
  ``s' = (1-α)·s + α·φ(u)``);
- ``_gather_bwd_kernel``: the transposed stencil, again a gather, at ``-o_k``:
  ``ds[b,c,j] = r·g_res[b,c,j] + Σ_k m[k,j-o_k]·w[k,j-o_k]·g[b,c,j-o_k]``;
- ``_weight_grad_kernel``: ``dw[k,i] = m[k,i]·Σ_{b,c} g[b,c,i]·s[b,c,nbr(i,k)]``,
  one program per tile of cells looping over ``b, c`` (no atomics), all ``K``
  offsets of the tile held at once; for ``propagate`` it forms
  ``du = g·α·φ'(u)`` on the way and can store it.

Grid of the two state gathers: ``(row = z*H + y) × bc-block`` on axis 0 (the
bc-blocks of one row run side by side, so they share the ``w`` row in L2),
x-blocks on axis 1. Each program keeps a ``[BLOCK_BC, BLOCK_X]`` accumulator and
loops over ``k`` at run time, reading the offsets from the ``[K, 3]`` int32
table; the ``w`` row segment is loaded once per ``k`` and serves all
``BLOCK_BC`` channels. Wrap and zero boundaries are resolved per axis: the
modulo is taken on the scalar offset only, so a periodic axis costs one
compare-and-subtract per element, and offsets larger than a 1- or 2-thick axis
still wrap correctly. Addresses are int64. Under ``TRITON_INTERPRET=1`` a
program takes all ``K`` offsets in one iteration (``K_BLOCK``) and tiles stay
small: the interpreter's cost is per operation and per program, not per element.

Precision (STYLE rule 5): fp16/bf16/fp32 are loaded and accumulated in fp32
(fp64 stays fp64), scalars in the accumulation dtype, results cast back.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import new_output
from ...contract import ACTIVATION_CODES, accumulation_dtype
from ...stencil import Geometry
from .tiles import (INTERPRET, TILE_TUNING, TL_ACC, activate, activate_grad, configs, k_block, mask_u8, neighbour,
                    on_device, stencil_tile, tile_grid)

@triton.jit
def _gather_tile(BC, D, H, W, BLOCK_BC: tl.constexpr, BLOCK_X: tl.constexpr):
    """This program's tile of a state gather: axis 0 is ``row × bc-block``
    (the bc-blocks of a row side by side), axis 1 the x-block. Returns the row,
    its (z, y), the bc and x index vectors with their masks, N = D·H·W and the
    int64 channel offsets ``bc·N``."""
    n_bcb = tl.cdiv(BC, BLOCK_BC)
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_bcb
    z = row // H
    y = row % H
    bc = (pid % n_bcb) * BLOCK_BC + tl.arange(0, BLOCK_BC).to(tl.int64)
    x = tl.program_id(1) * BLOCK_X + tl.arange(0, BLOCK_X)
    m_bc = bc < BC
    m_x = x < W
    N = tl.cast(D, tl.int64) * H * W
    p_bc = bc[:, None] * N
    return row, z, y, bc, x, m_bc, m_x, N, p_bc


@triton.jit
def _stencil_gather(
    p_src, p_w, p_mask, p_off, p_bc, m_bc, row, z, y, x, m_x, N, D, H, W, K: tl.constexpr,
    PZ: tl.constexpr, PY: tl.constexpr, PX: tl.constexpr,
    HAS_MASK: tl.constexpr, TRANSPOSED: tl.constexpr, ACC: tl.constexpr,
    BLOCK_BC: tl.constexpr, BLOCK_X: tl.constexpr, K_BLOCK: tl.constexpr,
):
    """The ``[BLOCK_BC, BLOCK_X]`` tile of ``Σ_k m[k,·]·w[k,·]·src[bc, i ± o_k]``.

    Forward (``TRANSPOSED`` False): ``Σ_k m[k,i]·w[k,i]·src[bc, i+o_k]``, the
    ``w`` row segment read once per ``k`` at the program's own cells.
    Transposed: ``Σ_k m[k,j-o_k]·w[k,j-o_k]·src[bc, j-o_k]``; the source
    ``j - o_k`` must exist (zero) or wraps (periodic), and then ``nbr(j-o_k, k) = j``.
    ``K_BLOCK`` offsets per iteration: 1 on GPU, where the loop over ``K`` (a
    constexpr) is unrolled so that all offsets' loads are in flight at once; all
    of them in the interpreter, whose cost is per operation, not per element.
    """
    kk = tl.arange(0, K_BLOCK)
    p_i = row * W + x
    m_bcx = m_bc[None, :, None]
    b_acc = tl.zeros([BLOCK_BC, BLOCK_X], dtype=ACC)
    for k0 in tl.static_range(0, K, K_BLOCK):
        k = k0 + kk
        m_k = k < K
        dz = tl.load(p_off + 3 * k, mask=m_k, other=0)
        dy = tl.load(p_off + 3 * k + 1, mask=m_k, other=0)
        dx = tl.load(p_off + 3 * k + 2, mask=m_k, other=0)
        if TRANSPOSED:
            dz, dy, dx = -dz, -dy, -dx
        zz, ok_z = neighbour(z, dz, D, PZ)
        yy, ok_y = neighbour(y, dy, H, PY)
        xx, ok_x = neighbour(x[None, :], dx[:, None], W, PX)
        m_i = (m_k & ok_z & ok_y)[:, None] & ok_x & m_x[None, :]
        p_nbr = ((zz * H + yy) * W)[:, None] + xx
        if TRANSPOSED:
            p_wk = k[:, None].to(tl.int64) * N + p_nbr
        else:
            p_wk = k[:, None].to(tl.int64) * N + p_i[None, :]
        b_w = tl.load(p_w + p_wk, mask=m_i, other=0.0).to(ACC)
        if HAS_MASK:
            b_m = tl.load(p_mask + p_wk, mask=m_i, other=0)
            b_w = tl.where(b_m != 0, b_w, 0.0)
        b_s = tl.load(p_src + p_bc[None, :, :] + p_nbr[:, None, :], mask=m_bcx & m_i[:, None, :], other=0.0)
        b_acc += tl.sum(b_w[:, None, :] * b_s.to(ACC), axis=0)
    return b_acc


@triton.autotune(configs=configs(), key=["W", "BC", "K", "ACT", "HAS_MASK", "EPILOGUE"])
@triton.jit
def _gather_fwd_kernel(
    p_s, p_w, p_mask, p_off, p_x, p_bias, p_out, p_u,
    leak: tl.float64,
    BC, C, D, H, W, K: tl.constexpr,
    PZ: tl.constexpr, PY: tl.constexpr, PX: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_X: tl.constexpr, HAS_BIAS: tl.constexpr,
    EPILOGUE: tl.constexpr, ACT: tl.constexpr, SAVE_U: tl.constexpr, ACC: tl.constexpr,
    BLOCK_BC: tl.constexpr, BLOCK_X: tl.constexpr, K_BLOCK: tl.constexpr,
):
    """``a[b,c,i] = Σ_k m[k,i]·w[k,i]·s[b,c,nbr(i,k)]``.

    EPILOGUE 0 stores ``a``; EPILOGUE 1 stores ``s' = (1-α)·s + α·φ(u)`` with
    ``u = a + x + bias`` (and ``u`` itself when SAVE_U).
    """
    row, z, y, bc, x, m_bc, m_x, N, p_bc = _gather_tile(BC, D, H, W, BLOCK_BC, BLOCK_X)

    b_acc = _stencil_gather(
        p_s, p_w, p_mask, p_off, p_bc, m_bc, row, z, y, x, m_x, N, D, H, W, K,
        PZ, PY, PX, HAS_MASK, False, ACC, BLOCK_BC, BLOCK_X, K_BLOCK,
    )

    p_i = p_bc + (row * W + x)[None, :]
    m_o = m_bc[:, None] & m_x[None, :]
    if EPILOGUE == 0:
        tl.store(p_out + p_i, b_acc.to(p_out.dtype.element_ty), mask=m_o)
    else:
        b_u = b_acc
        if HAS_X:
            b_u += tl.load(p_x + p_i, mask=m_o, other=0.0).to(ACC)
        if HAS_BIAS:
            p_c = (bc % C)[:, None] * N + (row * W + x)[None, :]
            b_u += tl.load(p_bias + p_c, mask=m_o, other=0.0).to(ACC)
        if SAVE_U:
            tl.store(p_u + p_i, b_u, mask=m_o)
        a = tl.full([], leak, ACC)
        b_c = tl.load(p_s + p_i, mask=m_o, other=0.0).to(ACC)
        b_out = (1.0 - a) * b_c + a * activate(b_u, ACT)
        tl.store(p_out + p_i, b_out.to(p_out.dtype.element_ty), mask=m_o)


@triton.autotune(configs=configs(), key=["W", "BC", "K", "HAS_MASK", "HAS_RES"])
@triton.jit
def _gather_bwd_kernel(
    p_g, p_w, p_mask, p_off, p_res, p_out,
    res_coef: tl.float64,
    BC, D, H, W, K: tl.constexpr,
    PZ: tl.constexpr, PY: tl.constexpr, PX: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_RES: tl.constexpr, ACC: tl.constexpr,
    BLOCK_BC: tl.constexpr, BLOCK_X: tl.constexpr, K_BLOCK: tl.constexpr,
):
    """``ds[b,c,j] = r·res[b,c,j] + Σ_k m[k,j-o_k]·w[k,j-o_k]·g[b,c,j-o_k]``.

    The residual term serves propagate (``r = 1-α``, ``res = g``).
    """
    row, z, y, bc, x, m_bc, m_x, N, p_bc = _gather_tile(BC, D, H, W, BLOCK_BC, BLOCK_X)

    b_acc = _stencil_gather(
        p_g, p_w, p_mask, p_off, p_bc, m_bc, row, z, y, x, m_x, N, D, H, W, K,
        PZ, PY, PX, HAS_MASK, True, ACC, BLOCK_BC, BLOCK_X, K_BLOCK,
    )

    p_j = p_bc + (row * W + x)[None, :]
    m_o = m_bc[:, None] & m_x[None, :]
    if HAS_RES:
        r = tl.full([], res_coef, ACC)
        b_acc += r * tl.load(p_res + p_j, mask=m_o, other=0.0).to(ACC)
    tl.store(p_out + p_j, b_acc.to(p_out.dtype.element_ty), mask=m_o)


@triton.autotune(key=["D", "H", "W", "BC", "K", "HAS_MASK", "FROM_U"], **TILE_TUNING)
@triton.jit
def _weight_grad_kernel(
    p_g, p_u, p_s, p_mask, p_off, p_dw, p_du,
    leak: tl.float64,
    BC, D, H, W, K,
    PZ: tl.constexpr, PY: tl.constexpr, PX: tl.constexpr,
    HAS_MASK: tl.constexpr, FROM_U: tl.constexpr, WRITE_DU: tl.constexpr, ACT: tl.constexpr,
    ACC: tl.constexpr, K_PAD: tl.constexpr, BLOCK_X: tl.constexpr,
):
    """``dw[k,i] = m[k,i]·Σ_{b,c} e[b,c,i]·s[b,c,nbr(i,k)]`` (0 outside a zero boundary).

    ``e = g`` (aggregate) or, with FROM_U, ``e = du = g·α·φ'(u)`` (propagate),
    stored to ``p_du`` when WRITE_DU. The program owns ``BLOCK_X`` cells of one
    row and all ``K`` offsets, and loops over ``b, c``: each ``e`` is formed once.
    """
    x, m_x, kk, m_k, p_nbr, m_kx, N, p_i = stencil_tile(p_off, D, H, W, K, PZ, PY, PX, K_PAD, BLOCK_X)

    b_acc = tl.zeros([K_PAD, BLOCK_X], dtype=ACC)
    if FROM_U:
        a = tl.full([], leak, ACC)
    for bc in range(BC):
        p_bc = bc * N
        b_e = tl.load(p_g + p_bc + p_i, mask=m_x, other=0.0).to(ACC)
        if FROM_U:
            b_u = tl.load(p_u + p_bc + p_i, mask=m_x, other=0.0).to(ACC)
            b_e = b_e * a * activate_grad(b_u, ACT)
            if WRITE_DU:
                tl.store(p_du + p_bc + p_i, b_e, mask=m_x)
        b_s = tl.load(p_s + p_bc + p_nbr, mask=m_kx, other=0.0)
        b_acc += b_e[None, :] * b_s.to(ACC)

    p_kx = kk[:, None].to(tl.int64) * N + p_i[None, :]
    m_o = m_k[:, None] & m_x[None, :]
    live = m_kx
    if HAS_MASK:
        live = live & (tl.load(p_mask + p_kx, mask=m_o, other=0) != 0)
    b_acc = tl.where(live, b_acc, 0.0)
    tl.store(p_dw + p_kx, b_acc.to(p_dw.dtype.element_ty), mask=m_o)


@triton.autotune(configs=configs(), key=["ACT"])
@triton.jit
def _du_kernel(p_g, p_u, p_du, leak: tl.float64, n, ACT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """``du = g·α·φ'(u)`` elementwise (when ``dw`` is not wanted)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    a = tl.full([], leak, ACC)
    b_g = tl.load(p_g + offs, mask=m, other=0.0).to(ACC)
    b_u = tl.load(p_u + offs, mask=m, other=0.0).to(ACC)
    tl.store(p_du + offs, b_g * a * activate_grad(b_u, ACT), mask=m)


def _blocks(BC: int, W: int) -> tuple:
    """``(BLOCK_BC, BLOCK_X)``: x covers a row up to 128; bc fills a tile of up
    to 2048 elements so that one ``w`` load serves as many channels as fit."""
    if INTERPRET:  # small tiles: tiny test shapes still cross tile edges
        return min(triton.next_power_of_2(BC), 4), min(triton.next_power_of_2(W), 8)
    block_x = max(16, min(triton.next_power_of_2(W), 128))
    block_bc = min(triton.next_power_of_2(BC), max(1, 2048 // block_x), 16)
    return block_bc, block_x


def _gather_fwd(s, w, mask, x, bias, geom: Geometry, leak: float, act: int, epilogue: int, save_u: bool):
    B, C, D, H, W = s.shape
    BC = B * C
    acc_t = accumulation_dtype(s.dtype)
    out = new_output(s.shape, s.dtype, s.device)
    u = new_output(s.shape, acc_t, s.device) if save_u else None
    block_bc, block_x = _blocks(BC, W)
    grid = (D * H * triton.cdiv(BC, block_bc), triton.cdiv(W, block_x))
    m = mask_u8(mask)
    _gather_fwd_kernel[grid](
        s, w, m if m is not None else w, geom.offsets_on(s.device, torch.int32),
        x if x is not None else s, bias if bias is not None else s, out, u if u is not None else out,
        float(leak), BC, C, D, H, W, geom.K,
        PZ=geom.periodic[0], PY=geom.periodic[1], PX=geom.periodic[2],
        HAS_MASK=m is not None, HAS_X=x is not None, HAS_BIAS=bias is not None,
        EPILOGUE=epilogue, ACT=act, SAVE_U=save_u, ACC=TL_ACC[acc_t],
        BLOCK_BC=block_bc, BLOCK_X=block_x, K_BLOCK=k_block(geom.K),
    )
    return out, u


def _gather_bwd(g, w, mask, geom: Geometry, out_dtype, res=None, res_coef: float = 0.0):
    B, C, D, H, W = g.shape
    BC = B * C
    acc_t = accumulation_dtype(out_dtype)
    out = new_output(g.shape, out_dtype, g.device)
    block_bc, block_x = _blocks(BC, W)
    grid = (D * H * triton.cdiv(BC, block_bc), triton.cdiv(W, block_x))
    m = mask_u8(mask)
    _gather_bwd_kernel[grid](
        g, w, m if m is not None else w, geom.offsets_on(g.device, torch.int32),
        res if res is not None else g, out,
        float(res_coef), BC, D, H, W, geom.K,
        PZ=geom.periodic[0], PY=geom.periodic[1], PX=geom.periodic[2],
        HAS_MASK=m is not None, HAS_RES=res is not None, ACC=TL_ACC[acc_t],
        BLOCK_BC=block_bc, BLOCK_X=block_x, K_BLOCK=k_block(geom.K),
    )
    return out


def _weight_grad(g, s, mask, geom: Geometry, w_dtype, u=None, leak: float = 1.0, act: int = 0,
                 du=None):
    B, C, D, H, W = s.shape
    K = geom.K
    acc_t = accumulation_dtype(s.dtype)
    dw = new_output((K, D, H, W), w_dtype, s.device)
    k_pad = triton.next_power_of_2(K)
    grid = tile_grid(D, H, W)
    m = mask_u8(mask)
    _weight_grad_kernel[grid](
        g, u if u is not None else g, s, m if m is not None else s, geom.offsets_on(s.device, torch.int32),
        dw, du if du is not None else dw,
        float(leak), B * C, D, H, W, K,
        PZ=geom.periodic[0], PY=geom.periodic[1], PX=geom.periodic[2],
        HAS_MASK=m is not None, FROM_U=u is not None, WRITE_DU=du is not None, ACT=act,
        ACC=TL_ACC[acc_t], K_PAD=k_pad,
    )
    return dw


def aggregate_forward(s, w, mask, geom: Geometry):
    """``a[b,c,i] = Σ_k m[k,i]·w[k,i]·s[b,c,nbr(i,k)]`` in the dtype of ``s``."""
    with on_device(s):
        out, _ = _gather_fwd(s, w, mask, None, None, geom, 1.0, 0, 0, False)
    return out


def aggregate_backward(g, s, w, mask, geom: Geometry, need_s: bool, need_w: bool):
    """``(ds, dw)``: the transposed gather of ``g`` and the weight gradient; None where not needed."""
    with on_device(s):
        ds = _gather_bwd(g, w, mask, geom, s.dtype) if need_s else None
        dw = _weight_grad(g, s, mask, geom, w.dtype) if need_w else None
    return ds, dw


def propagate_forward(s, w, mask, x, bias, geom: Geometry, leak: float, activation: str, save_u: bool):
    """``s' = (1-α)·s + α·φ(u)``, ``u = aggregate(s, w, mask) + x + bias``; one fused kernel.

    Returns ``(s', u)``, ``u`` (fp32, fp64 for fp64 input) only when ``save_u``.
    """
    with on_device(s):
        return _gather_fwd(s, w, mask, x, bias, geom, leak, ACTIVATION_CODES[activation], 1, save_u)


def propagate_backward(g, s, w, mask, u, geom: Geometry, leak: float, activation: str,
                       need_s: bool, need_w: bool, need_u: bool):
    """``du = g·α·φ'(u)``; ``ds = (1-α)·g + transposed gather of du``; ``dw`` from ``du`` and ``s``.

    ``du`` is formed inside the weight-gradient kernel when ``dw`` is wanted (and
    stored only if ``ds`` or the caller needs it), else by one elementwise kernel.
    """
    act = ACTIVATION_CODES[activation]
    du = new_output(u.shape, u.dtype, u.device) if (need_s or need_u) else None
    ds = dw = None
    with on_device(s):
        if need_w:
            dw = _weight_grad(g, s, mask, geom, w.dtype, u=u, leak=leak, act=act, du=du)
        elif du is not None:
            n, block = du.numel(), 1024
            _du_kernel[(triton.cdiv(n, block),)](g, u, du, float(leak), n, ACT=act,
                                                 ACC=TL_ACC[u.dtype], BLOCK=block)
        if need_s:
            ds = _gather_bwd(du, w, mask, geom, s.dtype, res=g, res_coef=1.0 - leak)
    return ds, dw, (du if need_u else None)
