"""The propagation ops as ``torch.library`` custom ops (namespace ``cellkern``).

``ck.ops.aggregate`` / ``propagate`` / ``propagate_steps`` validate their
arguments in Python, then call these ops; so ``torch.compile`` (also with
``fullgraph=True``) sees one opaque node per update with a fake (meta)
implementation for shapes, ``torch.library.opcheck`` can test them, and
autograd is registered through the library (``register_autograd``), with the
backward as custom ops too:

- ``cellkern::aggregate(s, w, mask, offsets, periodic, backend) -> a``
- ``cellkern::aggregate_backward(g, s, w, mask, offsets, periodic, backend, need_s, need_w) -> (ds, dw)``
- ``cellkern::propagate(s, w, mask, x, bias, offsets, periodic, leak, activation, backend, save_u) -> (s', u)``
- ``cellkern::propagate_backward(g, s, w, mask, u, offsets, periodic, leak, activation, backend,
  need_s, need_w, need_u) -> (ds, dw, du)``

The geometry travels as the flat offset list ``[dz₀, dy₀, dx₀, dz₁, …]`` (the
stencil's order) and the per-axis ``periodic`` flags; ``backend`` is the name
the dispatcher picked (the op runs that backend's kernels). Outputs that are
not wanted (``u`` without ``save_u``, unneeded gradients) are empty tensors.
The ELL form keeps its own autograd functions (:mod:`.forms`).

The mixing form (SPEC §11, ``w`` ``[K, C_out, C_in, D, H, W]``) has the same
four ops under the names ``cellkern::mixing_aggregate``,
``cellkern::mixing_aggregate_backward``, ``cellkern::mixing_propagate`` and
``cellkern::mixing_propagate_backward`` (``a`` of ``mixing_aggregate`` is
``[B, C_out, D, H, W]``), and ``cellkern::competitive_hebbian_(w!, s, beta!,
mask, offsets, periodic, eta, tau, eta_beta, wins, backend)``.

The plasticity family (in place, no autograd; the mutated arguments are
declared): ``cellkern::plasticity_(w!, mask, offsets, periodic, flags, scalars,
y, spikes, x_pre!, x_post!, theta!, gate, lr, backend)``,
``cellkern::heterosynaptic_normalize_(w!, mask, offsets, periodic, target, where, backend)``,
``cellkern::lateral_inhibition(y, beta, …) -> y'`` and ``cellkern::local_winners(y, threshold, …) -> win``.
"""
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import backends
from ..contract import accumulation_dtype, params_from_args
from ..stencil import geometry_from_args
from . import forms

__all__ = ["eager_direct", "aggregate_op", "propagate_op", "plasticity_op", "normalize_op", "lateral_inhibition_op",
           "local_winners_op", "mixing_aggregate_op", "mixing_propagate_op", "competitive_hebbian_op"]


def eager_direct(*tensors) -> bool:
    """True where a call may skip the custom-op layer and run the backend kernel
    itself: eager (not traced or compiled), no torch function or dispatch mode
    active (fake tensors, functionalisation, profilers that trace ops), and only
    plain tensors. The result is the same kernel on the same checked inputs; on
    small lattices the custom-op layer costs more than the kernel (issue 19).
    Calls that need autograd always go through the custom op."""
    if torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled() \
            or torch._C._len_torch_dispatch_stack():
        return False
    return all(t is None or type(t) is Tensor for t in tensors)


def _backend(name: str, device: torch.device, op: str):
    return backends.select(name, device, op)[1]


def _empty(t: Tensor) -> Tensor:
    return t.new_empty(0)


# --- aggregate --------------------------------------------------------------
@torch.library.custom_op("cellkern::aggregate", mutates_args=())
def aggregate_op(s: Tensor, w: Tensor, mask: Optional[Tensor], offsets: Sequence[int], periodic: Sequence[bool],
                 backend: str) -> Tensor:
    be = _backend(backend, s.device, "aggregate")
    return be.aggregate_forward(s, forms.weights_for(be, w, s.dtype), mask, geometry_from_args(tuple(offsets), tuple(periodic)))


@aggregate_op.register_fake
def _(s, w, mask, offsets, periodic, backend):
    return torch.empty_like(s)


@torch.library.custom_op("cellkern::aggregate_backward", mutates_args=())
def aggregate_backward_op(g: Tensor, s: Tensor, w: Tensor, mask: Optional[Tensor], offsets: Sequence[int],
                          periodic: Sequence[bool], backend: str, need_s: bool, need_w: bool) -> tuple[Tensor, Tensor]:
    be = _backend(backend, s.device, "aggregate")
    ds, dw = be.aggregate_backward(g.contiguous(), s, forms.weights_for(be, w, s.dtype), mask,
                                   geometry_from_args(tuple(offsets), tuple(periodic)), need_s, need_w)
    return (ds if ds is not None else _empty(s)), (dw.to(w.dtype) if dw is not None else _empty(w))


@aggregate_backward_op.register_fake
def _(g, s, w, mask, offsets, periodic, backend, need_s, need_w):
    return (torch.empty_like(s) if need_s else _empty(s)), (torch.empty_like(w) if need_w else _empty(w))


def _aggregate_setup(ctx, inputs, output):
    s, w, mask, offsets, periodic, backend = inputs
    ctx.save_for_backward(s, w, mask)
    ctx.meta = (offsets, periodic, backend)


def _aggregate_backward(ctx, g):
    s, w, mask = ctx.saved_tensors
    need_s, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    ds, dw = aggregate_backward_op(g, s, w, mask, *ctx.meta, need_s, need_w)
    return (ds if need_s else None), (dw if need_w else None), None, None, None, None


aggregate_op.register_autograd(_aggregate_backward, setup_context=_aggregate_setup)


# --- propagate --------------------------------------------------------------
@torch.library.custom_op("cellkern::propagate", mutates_args=())
def propagate_op(s: Tensor, w: Tensor, mask: Optional[Tensor], x: Optional[Tensor], bias: Optional[Tensor],
                 offsets: Sequence[int], periodic: Sequence[bool], leak: float, activation: str, backend: str,
                 save_u: bool) -> tuple[Tensor, Tensor]:
    be = _backend(backend, s.device, "propagate")
    out, u = be.propagate_forward(s, forms.weights_for(be, w, s.dtype), mask, x, bias,
                                  geometry_from_args(tuple(offsets), tuple(periodic)), leak, activation, save_u)
    return out, (u if u is not None else _empty(s))


@propagate_op.register_fake
def _(s, w, mask, x, bias, offsets, periodic, leak, activation, backend, save_u):
    u = s.new_empty(s.shape, dtype=accumulation_dtype(s.dtype)) if save_u else _empty(s)
    return torch.empty_like(s), u


@torch.library.custom_op("cellkern::propagate_backward", mutates_args=())
def propagate_backward_op(g: Tensor, s: Tensor, w: Tensor, mask: Optional[Tensor], u: Tensor, offsets: Sequence[int],
                          periodic: Sequence[bool], leak: float, activation: str, backend: str, need_s: bool,
                          need_w: bool, need_u: bool) -> tuple[Tensor, Tensor, Tensor]:
    be = _backend(backend, s.device, "propagate")
    ds, dw, du = be.propagate_backward(g.contiguous(), s, forms.weights_for(be, w, s.dtype), mask, u,
                                       geometry_from_args(tuple(offsets), tuple(periodic)), leak, activation,
                                       need_s, need_w, need_u)
    return ((ds if ds is not None else _empty(s)), (dw.to(w.dtype) if dw is not None else _empty(w)),
            (du if du is not None else _empty(u)))


@propagate_backward_op.register_fake
def _(g, s, w, mask, u, offsets, periodic, leak, activation, backend, need_s, need_w, need_u):
    return ((torch.empty_like(s) if need_s else _empty(s)), (torch.empty_like(w) if need_w else _empty(w)),
            (torch.empty_like(u) if need_u else _empty(u)))


def _propagate_setup(ctx, inputs, output):
    s, w, mask, x, bias, offsets, periodic, leak, activation, backend, save_u = inputs
    ctx.save_for_backward(s, w, mask, output[1])
    ctx.meta = (offsets, periodic, leak, activation, backend)
    ctx.x_dtype = None if x is None else x.dtype
    ctx.mark_non_differentiable(output[1])


def _propagate_backward(ctx, g, g_u):
    s, w, mask, u = ctx.saved_tensors
    need = ctx.needs_input_grad
    if u.numel() == 0 and any(need[:5]):
        raise RuntimeError("cellkern::propagate: backward needs the forward to run with save_u=True")
    offsets, periodic, leak, activation, backend = ctx.meta
    ds, dw, du = propagate_backward_op(g, s, w, mask, u, offsets, periodic, leak, activation, backend,
                                       need[0], need[1], need[3] or need[4])
    dx = du.to(ctx.x_dtype) if need[3] else None
    dbias = du.sum(0).to(s.dtype) if need[4] else None
    return ((ds if need[0] else None), (dw if need[1] else None), None, dx, dbias) + (None,) * 6


propagate_op.register_autograd(_propagate_backward, setup_context=_propagate_setup)


# --- plasticity (in place, no autograd) --------------------------------------
@torch.library.custom_op("cellkern::plasticity_", mutates_args=("w", "x_pre", "x_post", "theta"))
def plasticity_op(w: Tensor, mask: Optional[Tensor], offsets: Sequence[int], periodic: Sequence[bool],
                  flags: Sequence[bool], scalars: Sequence[float], y: Optional[Tensor], spikes: Optional[Tensor],
                  x_pre: Optional[Tensor], x_post: Optional[Tensor], theta: Optional[Tensor], gate: Optional[Tensor],
                  lr: Optional[Tensor], backend: str) -> None:
    """The fused plasticity step of SPEC §4, in place on ``w``, the traces and θ."""
    be = _backend(backend, w.device, "plasticity_step_")
    be.plasticity_(w, mask, geometry_from_args(tuple(offsets), tuple(periodic)), params_from_args(flags, scalars),
                   y, spikes, x_pre, x_post, theta, gate, lr)


@plasticity_op.register_fake
def _(w, mask, offsets, periodic, flags, scalars, y, spikes, x_pre, x_post, theta, gate, lr, backend):
    return None


@torch.library.custom_op("cellkern::heterosynaptic_normalize_", mutates_args=("w",))
def normalize_op(w: Tensor, mask: Optional[Tensor], offsets: Sequence[int], periodic: Sequence[bool],
                 target: Tensor, where: Optional[Tensor], backend: str) -> None:
    be = _backend(backend, w.device, "heterosynaptic_normalize_")
    be.heterosynaptic_normalize_(w, mask, geometry_from_args(tuple(offsets), tuple(periodic)), target, where)


@normalize_op.register_fake
def _(w, mask, offsets, periodic, target, where, backend):
    return None


@torch.library.custom_op("cellkern::lateral_inhibition", mutates_args=())
def lateral_inhibition_op(y: Tensor, beta: float, offsets: Sequence[int], periodic: Sequence[bool],
                          backend: str) -> Tensor:
    be = _backend(backend, y.device, "lateral_inhibition")
    return be.lateral_inhibition(y, beta, geometry_from_args(tuple(offsets), tuple(periodic)))


@lateral_inhibition_op.register_fake
def _(y, beta, offsets, periodic, backend):
    return torch.empty_like(y)


@torch.library.custom_op("cellkern::local_winners", mutates_args=())
def local_winners_op(y: Tensor, threshold: float, offsets: Sequence[int], periodic: Sequence[bool],
                     backend: str) -> Tensor:
    be = _backend(backend, y.device, "local_winners")
    return be.local_winners(y, threshold, geometry_from_args(tuple(offsets), tuple(periodic)))


@local_winners_op.register_fake
def _(y, threshold, offsets, periodic, backend):
    return torch.empty_like(y, dtype=torch.bool)


# --- the mixing form (SPEC §11): w [K, C_out, C_in, D, H, W] -----------------
# The same four ops as the shared form (named mixing_*), and the competitive
# Hebbian step, in place on w and beta (no autograd).
@torch.library.custom_op("cellkern::mixing_aggregate", mutates_args=())
def mixing_aggregate_op(s: Tensor, w: Tensor, mask: Optional[Tensor], offsets: Sequence[int],
                        periodic: Sequence[bool], backend: str) -> Tensor:
    be = _backend(backend, s.device, "aggregate")
    return be.mixing_aggregate_forward(s, forms.weights_for(be, w, s.dtype), mask,
                                       geometry_from_args(tuple(offsets), tuple(periodic)))


@mixing_aggregate_op.register_fake
def _(s, w, mask, offsets, periodic, backend):
    return s.new_empty((s.shape[0], w.shape[1]) + tuple(s.shape[2:]))


@torch.library.custom_op("cellkern::mixing_aggregate_backward", mutates_args=())
def mixing_aggregate_backward_op(g: Tensor, s: Tensor, w: Tensor, mask: Optional[Tensor], offsets: Sequence[int],
                                 periodic: Sequence[bool], backend: str, need_s: bool,
                                 need_w: bool) -> tuple[Tensor, Tensor]:
    be = _backend(backend, s.device, "aggregate")
    ds, dw = be.mixing_aggregate_backward(g.contiguous(), s, forms.weights_for(be, w, s.dtype), mask,
                                          geometry_from_args(tuple(offsets), tuple(periodic)), need_s, need_w)
    return (ds if ds is not None else _empty(s)), (dw.to(w.dtype) if dw is not None else _empty(w))


@mixing_aggregate_backward_op.register_fake
def _(g, s, w, mask, offsets, periodic, backend, need_s, need_w):
    return (torch.empty_like(s) if need_s else _empty(s)), (torch.empty_like(w) if need_w else _empty(w))


def _mixing_aggregate_backward(ctx, g):
    s, w, mask = ctx.saved_tensors
    need_s, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    ds, dw = mixing_aggregate_backward_op(g, s, w, mask, *ctx.meta, need_s, need_w)
    return (ds if need_s else None), (dw if need_w else None), None, None, None, None


mixing_aggregate_op.register_autograd(_mixing_aggregate_backward, setup_context=_aggregate_setup)


@torch.library.custom_op("cellkern::mixing_propagate", mutates_args=())
def mixing_propagate_op(s: Tensor, w: Tensor, mask: Optional[Tensor], x: Optional[Tensor], bias: Optional[Tensor],
                        offsets: Sequence[int], periodic: Sequence[bool], leak: float, activation: str, backend: str,
                        save_u: bool) -> tuple[Tensor, Tensor]:
    be = _backend(backend, s.device, "propagate")
    out, u = be.mixing_propagate_forward(s, forms.weights_for(be, w, s.dtype), mask, x, bias,
                                         geometry_from_args(tuple(offsets), tuple(periodic)), leak, activation, save_u)
    return out, (u if u is not None else _empty(s))


@mixing_propagate_op.register_fake
def _(s, w, mask, x, bias, offsets, periodic, leak, activation, backend, save_u):
    u = s.new_empty(s.shape, dtype=accumulation_dtype(s.dtype)) if save_u else _empty(s)
    return torch.empty_like(s), u


@torch.library.custom_op("cellkern::mixing_propagate_backward", mutates_args=())
def mixing_propagate_backward_op(g: Tensor, s: Tensor, w: Tensor, mask: Optional[Tensor], u: Tensor,
                                 offsets: Sequence[int], periodic: Sequence[bool], leak: float, activation: str,
                                 backend: str, need_s: bool, need_w: bool,
                                 need_u: bool) -> tuple[Tensor, Tensor, Tensor]:
    be = _backend(backend, s.device, "propagate")
    ds, dw, du = be.mixing_propagate_backward(g.contiguous(), s, forms.weights_for(be, w, s.dtype), mask, u,
                                              geometry_from_args(tuple(offsets), tuple(periodic)), leak, activation,
                                              need_s, need_w, need_u)
    return ((ds if ds is not None else _empty(s)), (dw.to(w.dtype) if dw is not None else _empty(w)),
            (du if du is not None else _empty(u)))


@mixing_propagate_backward_op.register_fake
def _(g, s, w, mask, u, offsets, periodic, leak, activation, backend, need_s, need_w, need_u):
    return ((torch.empty_like(s) if need_s else _empty(s)), (torch.empty_like(w) if need_w else _empty(w)),
            (torch.empty_like(u) if need_u else _empty(u)))


def _mixing_propagate_backward(ctx, g, g_u):
    s, w, mask, u = ctx.saved_tensors
    need = ctx.needs_input_grad
    if u.numel() == 0 and any(need[:5]):
        raise RuntimeError("cellkern::mixing_propagate: backward needs the forward to run with save_u=True")
    offsets, periodic, leak, activation, backend = ctx.meta
    ds, dw, du = mixing_propagate_backward_op(g, s, w, mask, u, offsets, periodic, leak, activation, backend,
                                              need[0], need[1], need[3] or need[4])
    dx = du.to(ctx.x_dtype) if need[3] else None
    dbias = du.sum(0).to(s.dtype) if need[4] else None
    return ((ds if need[0] else None), (dw if need[1] else None), None, dx, dbias) + (None,) * 6


mixing_propagate_op.register_autograd(_mixing_propagate_backward, setup_context=_propagate_setup)


@torch.library.custom_op("cellkern::competitive_hebbian_", mutates_args=("w", "beta"))
def competitive_hebbian_op(w: Tensor, s: Tensor, beta: Tensor, mask: Optional[Tensor], offsets: Sequence[int],
                           periodic: Sequence[bool], eta: float, tau: float, eta_beta: float, wins: bool,
                           backend: str) -> None:
    """The competitive Hebbian step of SPEC §11, in place on ``w`` and ``beta``.

    A backend without ``MIXED_WEIGHTS`` gets ``w`` in the dtype of ``s`` (a
    transient copy, written back)."""
    be = _backend(backend, w.device, "competitive_hebbian_step_")
    geom = geometry_from_args(tuple(offsets), tuple(periodic))
    wb = forms.weights_for(be, w, s.dtype)
    be.competitive_hebbian_(wb, s, beta, mask, geom, eta, tau, eta_beta, wins)
    if wb is not w:
        w.copy_(wb)


@competitive_hebbian_op.register_fake
def _(w, s, beta, mask, offsets, periodic, eta, tau, eta_beta, wins, backend):
    return None
