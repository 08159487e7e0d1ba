"""The weight forms the ops take (SPEC §5) and the autograd of the ELL form.

``resolve`` turns an op's ``(w, mask)`` arguments into one of two forms:

- dense: ``w [K, D, H, W]`` and a bool mask or None (a packed int32 mask is
  unpacked here);
- ELL: ``w_ell [Kmax, D, H, W]`` and ``idx`` uint8, from a
  :class:`~cellkern.sparse.SparseWeights` passed as ``w`` or from ``w_ell``
  passed as ``w`` with ``idx`` as ``mask``.

Backends that have native ELL kernels expose ``aggregate_forward_ell`` /
``propagate_forward_ell``; for the others (and for every backward) the ELL
pair is expanded to the dense masked form (``from_ell``) and the dense kernel
runs — the same result, with a transient dense ``w`` (see
``cellkern/backends/__init__.py``).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .. import sparse
from .. import validation


def resolve(op: str, w, mask, K: int, dims) -> tuple:
    """``(w, mask, idx)``: ``idx`` None for the dense form (then ``mask`` is a
    bool mask or None), else ``w`` is ``w_ell`` and ``mask`` None."""
    if isinstance(w, sparse.SparseWeights):
        if mask is not None:
            raise ValueError(f"{op}: mask must be None when w is a SparseWeights (its idx is the mask), "
                             f"got a {type(mask).__name__}")
        if w.K != K:
            raise ValueError(f"{op}: w is a SparseWeights of K = {w.K} offsets, the stencil has K = {K}")
        return w.w_ell, None, w.idx
    if (isinstance(mask, torch.Tensor) and mask.dim() == 4 and not mask.dtype.is_floating_point
            and (mask.dtype == torch.uint8 or (mask.dtype != torch.bool and mask.shape[0] != K))):
        # a uint8 [Kmax, D, H, W] mask is the idx of an ELL pair; another integer
        # one with Kmax != K is one too, of the wrong dtype (check_ell says so)
        sparse.check_ell(op, w, mask, K)
        return w, None, validation.contiguous(mask)
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.int32 and dims is not None:
        mask = sparse.dense_mask(op, mask, K, dims, mask.device)
    return w, mask, None


def weights_for(be, w, dtype):
    """``w`` as the backend takes it: backends without ``MIXED_WEIGHTS``
    (kernels for one dtype of ``s`` and ``w``) get a copy in the state dtype."""
    if w.dtype == dtype or getattr(be, "MIXED_WEIGHTS", False):
        return w
    return w.to(dtype)


def dense_of(w_ell, idx, K, be=None):
    """The dense masked form ``(w, mask)`` of an ELL pair, for the kernels
    that take no ELL: the backend's ``ell_expand`` where it has one (one pass),
    else :func:`cellkern.sparse.expand_ell`."""
    if hasattr(be, "ell_expand") and w_ell.is_contiguous():
        return be.ell_expand(w_ell, idx, K)
    return sparse.expand_ell(w_ell, idx, K)


def gather_of(dense, idx, K, be=None):
    """The ELL values ``dense[idx[j, i], i]`` (0 in empty slots) of a dense ``[K, D, H, W]`` tensor."""
    if hasattr(be, "ell_gather_") and dense.is_contiguous():
        out = torch.empty(idx.shape, dtype=dense.dtype, device=dense.device)
        be.ell_gather_(out, idx, dense)
        return out
    return sparse.gather_ell(dense, idx, K)


class AggregateEll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, w_ell, idx, geom, be):
        ctx.geom, ctx.be = geom, be
        ctx.save_for_backward(s, w_ell, idx)
        if hasattr(be, "aggregate_forward_ell"):
            return be.aggregate_forward_ell(s, weights_for(be, w_ell, s.dtype), idx, geom)
        w, m = dense_of(w_ell, idx, geom.K, be)
        return be.aggregate_forward(s, weights_for(be, w, s.dtype), m, geom)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        s, w_ell, idx = ctx.saved_tensors
        w, m = dense_of(w_ell, idx, ctx.geom.K, ctx.be)
        ds, dw = ctx.be.aggregate_backward(validation.contiguous(g), s, weights_for(ctx.be, w, s.dtype), m, ctx.geom,
                                           ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        dw_ell = gather_of(dw, idx, ctx.geom.K, ctx.be).to(w_ell.dtype) if dw is not None else None
        return ds, dw_ell, None, None, None


class PropagateEll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, w_ell, idx, x, bias, geom, leak, activation, be):
        need = ctx.needs_input_grad
        save = need[0] or need[1] or need[3] or need[4]
        wr = weights_for(be, w_ell, s.dtype)
        if hasattr(be, "propagate_forward_ell"):
            out, u = be.propagate_forward_ell(s, wr, idx, x, bias, geom, leak, activation, save)
        else:
            w, m = dense_of(wr, idx, geom.K, be)
            out, u = be.propagate_forward(s, w, m, x, bias, geom, leak, activation, save)
        if save:
            ctx.save_for_backward(s, w_ell, idx, u)
        ctx.geom, ctx.leak, ctx.activation, ctx.be = geom, leak, activation, be
        ctx.x_dtype = None if x is None else x.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        s, w_ell, idx, u = ctx.saved_tensors
        need = ctx.needs_input_grad
        w, m = dense_of(weights_for(ctx.be, w_ell, s.dtype), idx, ctx.geom.K, ctx.be)
        ds, dw, du = ctx.be.propagate_backward(
            validation.contiguous(g), s, w, m, u, ctx.geom, ctx.leak, ctx.activation,
            need[0], need[1], need[3] or need[4],
        )
        dw_ell = gather_of(dw, idx, ctx.geom.K, ctx.be).to(w_ell.dtype) if need[1] else None
        dx = du.to(ctx.x_dtype) if need[3] else None
        dbias = du.sum(0).to(s.dtype) if need[4] else None
        return ds, dw_ell, None, dx, dbias, None, None, None, None
