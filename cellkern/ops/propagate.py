"""Lattice propagation ops (SPEC §2): validation → dispatch → autograd.Function."""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .. import backends
from ..contract import ACTIVATIONS
from ..stencil import geometry
from . import forms
from . import library
from . import mixing
from .. import validation

__all__ = ["aggregate", "propagate", "propagate_steps"]


def aggregate(s, w, mask=None, *, stencil="moore", boundary="periodic", backend=None):
    """Weighted sum of each cell's neighbours.

    ``a[b,c,i] = Σ_k m[k,i] · w[k,i] · s[b,c,nbr(i,k)]`` (shared form), or with
    channel mixing (SPEC §11) ``a[b,o,i] = Σ_k m[k,i] · Σ_c W[k,o,c,i] · s[b,c,nbr(i,k)]``

    Args:
        s: state ``[B, C, D, H, W]``, float16/bfloat16/float32/float64.
        w: weights ``[K, D, H, W]`` on the device of ``s``, in its dtype or (for
            fp32/fp64 ``s``) a lower precision (mixed precision: fp16/bf16
            weights, fp32 accumulation); ``w[k, i]`` is the synapse from
            ``nbr(i, k)`` onto ``i``. Or the ELL form: a
            :class:`~cellkern.sparse.SparseWeights`, or ``w_ell``
            ``[Kmax, D, H, W]`` with its uint8 ``idx`` as ``mask`` (gradients
            then flow to ``w_ell``).
        mask: optional bool ``[K, D, H, W]`` (False = pruned, acts as 0), a
            packed int32 ``[D, H, W]`` mask (:func:`cellkern.sparse.pack_mask`)
            or the ``idx`` of ``w_ell``. Default: None.
        stencil: ``"von_neumann"``, ``"moore18"``, ``"moore"``, ``"radius(r)"``
            or a :class:`~cellkern.Stencil`. Default: ``"moore"``.
        boundary: ``"periodic"``, ``"zero"`` or a per-axis 3-tuple (z, y, x).
            Default: ``"periodic"``.
        backend: ``None`` (fastest for the device), ``"reference"``, ``"cpu"``,
            ``"triton"`` or ``"cuda"``. Default: None (or ``$CELLKERN_BACKEND``).

    Returns:
        ``a`` ``[B, C, D, H, W]`` (``[B, C_out, D, H, W]`` for the mixing form) in the
        dtype of ``s`` (accumulated in fp32). Differentiable in ``s`` and ``w``.

    Example:
        >>> import torch, cellkern as ck
        >>> s = torch.randn(2, 4, 8, 8, 8)
        >>> w = torch.rand(26, 8, 8, 8)
        >>> ck.ops.aggregate(s, w).shape
        torch.Size([2, 4, 8, 8, 8])
    """
    op = "aggregate"
    geom = geometry(op, stencil, boundary)
    validation.check_state(op, s)
    if mixing.is_mixing(w):
        w, mask = mixing.mixing_weights(op, w, mask, geom.K, s, square=False)
        return library.mixing_aggregate_op(validation.contiguous(s), validation.contiguous(w), validation.contiguous(mask), *geom.op_args,
                                     mixing.select(backend, s.device, op))
    w, mask, idx = _weights(op, w, mask, geom, s)
    name, be = backends.select(backend, s.device, op)
    if idx is not None:
        return forms.AggregateEll.apply(validation.contiguous(s), validation.contiguous(w), idx, geom, be)
    return library.aggregate_op(validation.contiguous(s), validation.contiguous(w), validation.contiguous(mask), *geom.op_args, name)


def _weights(op, w, mask, geom, s):
    """The checked weight form: ``(w, mask, idx)``, ``idx`` None when dense (see :mod:`.forms`)."""
    mixing.check_form(op, w, geom.K, s.shape[2:])
    w, mask, idx = forms.resolve(op, w, mask, geom.K, tuple(s.shape[2:]))
    validation.check_weights(op, w, s, geom.K, slots=idx is not None)
    if idx is None:
        validation.check_mask(op, mask, geom.K, s)
    elif idx.device != s.device:
        raise ValueError(f"{op}: idx must be on the device of s ({s.device}), got {idx.device}")
    return w, mask, idx


def _prepare_propagate(op, s, w, mask, x, bias, leak, activation, stencil, boundary, backend):
    geom = geometry(op, stencil, boundary)
    validation.check_state(op, s)
    if mixing.is_mixing(w):
        w, mask = mixing.mixing_weights(op, w, mask, geom.K, s, square=True)
        idx = None
        name = mixing.select(backend, s.device, op)
        be = (name, backends.module(name))
    else:
        w, mask, idx = _weights(op, w, mask, geom, s)
        be = backends.select(backend, s.device, op)  # (name, module)
    validation.check_bias(op, bias, s)
    leak = validation.check_leak(op, leak)
    activation = validation.check_choice(op, "activation", activation, ACTIVATIONS)
    if activation == "triangle" and s.shape[1] < 2:
        raise ValueError(f"{op}: activation 'triangle' needs at least 2 channels per cell (it subtracts their "
                         f"mean), got C = {s.shape[1]}")
    if bias is not None and bias.dim() == 1:
        bias = bias.view(-1, 1, 1, 1).expand(bias.shape[0], *s.shape[2:])
    return geom, leak, activation, be, validation.contiguous(w), validation.contiguous(mask), idx, validation.contiguous(bias)


def _step(s, w, mask, idx, x, bias, geom, leak, activation, be):
    """One :func:`propagate` of checked inputs, dense, ELL or mixing; ``be`` is ``(name, module)``.

    ``triangle`` in the shared form: the kernels' ``identity`` update with α = 1
    gives ``u``, then :func:`.mixing.triangle_update` (torch, differentiable)."""
    name, mod = be
    if activation == "triangle" and w.dim() != 6:
        return mixing.triangle_update(s, _step(s, w, mask, idx, x, bias, geom, 1.0, "identity", be), leak)
    if idx is not None:
        return forms.PropagateEll.apply(s, w, idx, x, bias, geom, leak, activation, mod)
    save_u = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (s, w, x, bias))
    if not save_u and library.eager_direct(s, w, mask, x, bias):
        kernel = mod.mixing_propagate_forward if w.dim() == 6 else mod.propagate_forward
        return kernel(s, forms.weights_for(mod, w, s.dtype), mask, x, bias, geom, leak, activation, False)[0]
    op = library.mixing_propagate_op if w.dim() == 6 else library.propagate_op
    return op(s, w, mask, x, bias, *geom.op_args, leak, activation, name, save_u)[0]


def _drive(x, s):
    """``x`` broadcast to the shape of ``s`` (expand is differentiable: its
    backward sums the gradient back to the broadcast shape)."""
    if x is None:
        return None
    if tuple(x.shape) != tuple(s.shape):
        x = x.expand(s.shape)
    return validation.contiguous(x)


def propagate(s, w, mask=None, x=None, bias=None, *, leak=1.0, activation="tanh",
              stencil="moore", boundary="periodic", backend=None):
    """One fused cell update.

    ``s' = (1-α)·s + α·φ(aggregate(s, w, mask) + x + bias)``

    Args:
        s: state ``[B, C, D, H, W]``.
        w: weights ``[K, D, H, W]``, the ELL form, or the mixing form
            ``[K, C, C, D, H, W]`` (C_out = C_in), as in :func:`aggregate`.
        mask: optional mask, as in :func:`aggregate`. Default: None.
        x: optional external drive, shaped like ``s`` or broadcastable to it. Default: None.
        bias: optional ``[C]`` or ``[C, D, H, W]``. Default: None.
        leak: α in [0, 1]; 1 replaces the state, 0 keeps it. Default: 1.0.
        activation: φ, one of ``identity``, ``tanh``, ``relu``, ``sigmoid`` or ``triangle``
            (``relu(u[o] − mean_c u[c])`` over the cell's channels, C ≥ 2; in the shared
            form a torch epilogue after the kernel). Default: ``"tanh"``.
        stencil, boundary, backend: as in :func:`aggregate`.

    Returns:
        ``s'`` shaped and typed like ``s``. Gradients flow to ``s``, ``w``, ``x`` and ``bias``.

    Example:
        >>> import torch, cellkern as ck
        >>> s = torch.zeros(1, 1, 8, 8, 8)
        >>> w = torch.full((26, 8, 8, 8), 0.05)
        >>> ck.ops.propagate(s, w, x=torch.ones_like(s), leak=0.5).mean().item() > 0
        True
    """
    op = "propagate"
    geom, leak, activation, be, w, mask, idx, bias = _prepare_propagate(
        op, s, w, mask, x, bias, leak, activation, stencil, boundary, backend)
    validation.check_drive(op, x, s)
    return _step(validation.contiguous(s), w, mask, idx, _drive(x, s), bias, geom, leak, activation, be)


def propagate_steps(s, w, steps, mask=None, x=None, bias=None, *, checkpoint_every=None, leak=1.0,
                    activation="tanh", stencil="moore", boundary="periodic", backend=None):
    """``steps`` unrolled :func:`propagate` updates with the same weights.

    Args:
        s, w, mask, bias, leak, activation, stencil, boundary, backend: as in :func:`propagate`.
        steps: T, the number of updates (a positive int).
        x: optional drive: broadcastable to ``s`` (the same drive every step), or
            ``[T, B, C, D, H, W]`` (one drive per step). Default: None.
        checkpoint_every: k. If set, backward keeps only every k-th state and
            recomputes the k steps in between (activation memory ~ T/k + k
            states instead of T). Default: None (store every step).

    Returns:
        The state after T steps.

    Example:
        >>> import torch, cellkern as ck
        >>> s = torch.randn(1, 2, 6, 6, 6)
        >>> w = torch.rand(26, 6, 6, 6) * 0.05
        >>> ck.ops.propagate_steps(s, w, 4, checkpoint_every=2).shape
        torch.Size([1, 2, 6, 6, 6])
    """
    op = "propagate_steps"
    steps = validation.check_positive_int(op, "steps", steps)
    k = validation.check_positive_int(op, "checkpoint_every", checkpoint_every, allow_none=True)
    geom, leak, activation, be, w, mask, idx, bias = _prepare_propagate(
        op, s, w, mask, x, bias, leak, activation, stencil, boundary, backend)
    per_step = x is not None and isinstance(x, torch.Tensor) and x.dim() == 6
    if per_step:
        if x.shape[0] != steps:
            raise ValueError(f"{op}: a per-step x must have shape (T, B, C, D, H, W) with T = steps = {steps}, "
                             f"got {tuple(x.shape)}")
        for t in range(steps):
            validation.check_drive(op, x[t], s, name=f"x[{t}]")
    else:
        validation.check_drive(op, x, s)
        x = _drive(x, s)

    def run(state, t0, t1):
        for t in range(t0, t1):
            xt = _drive(x[t], state) if per_step else x
            state = _step(state, w, mask, idx, xt, bias, geom, leak, activation, be)
        return state

    state = validation.contiguous(s)
    if k is None or not torch.is_grad_enabled():
        return run(state, 0, steps)
    for t0 in range(0, steps, k):
        state = checkpoint(run, state, t0, min(t0 + k, steps), use_reentrant=False)
    return state
