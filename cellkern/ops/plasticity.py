"""Plasticity ops (SPEC §4): in place on ``w``, no autograd.

Every op here is one call of the backends' ``plasticity_`` with the parts it
does not use switched off, so the separate rules and the fused step share one
kernel per backend and one reference.

State dtype: the traces and θ share one float dtype (the *state dtype*); the
read-only per-cell inputs (``y``, ``z``, ``gate``, a per-cell ``lr_scale``) are
cast to it. ``w`` may have any float dtype; all arithmetic is fp32 (fp64 when
``w`` or the state is fp64). fp16/bf16 weights are updated in an fp32 copy
and rounded back *stochastically* (SPEC §5): the uniform of synapse
``k·N + i`` is a hash of ``(seed, step, k·N + i)`` (:mod:`.rounding`), so
updates below the dtype's spacing are kept on average, and every backend
rounds alike. ``seed`` and ``step`` are keywords of every op; ``step=None``
takes ``state.step`` in :func:`plasticity_step_` (which then advances it) and
a process-wide counter in the others.

``w`` may also be the ELL form (a :class:`~cellkern.sparse.SparseWeights`,
or ``w_ell`` with its uint8 ``idx`` as ``mask``; updated in place in
``w_ell``) and ``mask`` a packed int32 mask. The ELL form runs as its dense
masked form (expanded, updated, written back to the live slots) on every
backend: the same result, with a transient dense ``w``.
"""
from __future__ import annotations

import math
import numbers

import torch

from .. import backends
from .. import sparse
from ..rules import PlasticityParams, PlasticityRule, PlasticityState, WEIGHT_DEPENDENCES
from . import forms
from . import library
from .. import validation
from ..contract import accumulation_dtype, params_args
from ..stencil import geometry, live_synapses
from .rounding import next_step, round_weights_

__all__ = ["stdp_", "bcm_", "plasticity_step_", "synapse_l1", "heterosynaptic_normalize_"]


class WeightsForm:
    """The weights an op updates: ``w`` (dense ``[K, D, H, W]``, or ``w_ell``
    when ``idx`` is set) and the bool mask of the dense form."""

    def __init__(self, w, mask, idx):
        self.w, self.mask, self.idx = w, mask, idx


def _begin(op, w, mask, stencil, boundary, backend):
    geom = geometry(op, stencil, boundary)
    if isinstance(w, torch.Tensor) and w.dim() == 4:
        dims = tuple(w.shape[1:])
    elif isinstance(w, sparse.SparseWeights):
        dims = w.dims
    else:
        dims = None
    w, mask, idx = forms.resolve(op, w, mask, geom.K, dims)
    if idx is None:
        dims = validation.check_lattice_weights(op, w, geom.K)
        if mask is not None:
            validation.check_tensor(op, "mask", mask)
            if mask.dtype != torch.bool:
                raise TypeError(f"{op}: mask must be a bool tensor (False = pruned), got {mask.dtype}")
            if tuple(mask.shape) != tuple(w.shape):
                raise ValueError(f"{op}: mask must have shape (K, D, H, W) = {tuple(w.shape)}, "
                                 f"got {tuple(mask.shape)}")
            if mask.device != w.device:
                raise ValueError(f"{op}: mask must be on the device of w ({w.device}), got {mask.device}")
    _, be = backends.select(backend, w.device, op)
    return geom, tuple(dims), be, WeightsForm(w, mask, idx)


def rounding_counter(op, seed, step):
    """The stochastic-rounding counter ``(seed, step)``; ``step`` None takes the next of the process-wide counter."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise TypeError(f"{op}: seed must be a non-negative int, got {type(seed).__name__} {seed!r}")
    if step is None:
        return int(seed), next_step()
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise TypeError(f"{op}: step must be a non-negative int or None, got {type(step).__name__} {step!r}")
    return int(seed), int(step)


def _same_dtype(op, names_tensors):
    first_name, first = names_tensors[0]
    for name, t in names_tensors[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: {name} must have the dtype of {first_name} ({first.dtype}), got {t.dtype}")
    return first.dtype


def _cast(t, dtype):
    return None if t is None else validation.contiguous(t.to(dtype))


class _InPlace:
    """Contiguous working copies of tensors updated in place, written back
    to the caller's tensors on exit when a copy was needed."""

    def __init__(self, *tensors):
        self.orig = tensors
        self.work = tuple(validation.contiguous(t) for t in tensors)

    def __enter__(self):
        return self.work

    def __exit__(self, *exc):
        if exc[0] is None:
            for o, t in zip(self.orig, self.work):
                if t is not None and t is not o:
                    o.copy_(t)
        return False


def update_in_place(wf: WeightsForm, geom, seed_step, kernel, be=None):
    """Run ``kernel(w, mask)`` in place on the dense masked form of ``wf``.

    fp16/bf16 weights are updated in an fp32 copy and rounded back
    stochastically with the counter ``seed_step`` (see :mod:`.rounding`); the
    ELL form is expanded to the dense masked form and its live slots written
    back (empty slots stay 0)."""
    if wf.idx is not None:
        dense, mask = forms.dense_of(wf.w, wf.idx, geom.K, be)
    else:
        dense, mask = wf.w, wf.mask
    low = dense.dtype in (torch.float16, torch.bfloat16)
    work = dense.float() if low else dense
    with _InPlace(work) as (work_,):
        kernel(work_, validation.contiguous(mask))
    if low:
        if hasattr(be, "stochastic_round_") and dense.is_contiguous():
            be.stochastic_round_(dense, work, *seed_step)  # the same bits as round_weights_, in one pass
        else:
            round_weights_(dense, work, *seed_step)
    if wf.idx is not None:
        if hasattr(be, "ell_gather_") and wf.w.is_contiguous():
            be.ell_gather_(wf.w, wf.idx, dense)
        else:
            wf.w.copy_(sparse.gather_ell(dense, wf.idx, geom.K))


def _run(be, wf, geom, p, seed_step, y=None, spikes=None, x_pre=None, x_post=None, theta=None, gate=None, lr=None):
    def kernel(w_, m_):
        if library.eager_direct(w_, m_, y, spikes, xp_, xq_, th_, gate, lr):
            be.plasticity_(w_, m_, geom, p, y, spikes, xp_, xq_, th_, gate, lr)
        else:
            library.plasticity_op(w_, m_, *geom.op_args, *params_args(p), y, spikes, xp_, xq_, th_, gate, lr,
                                  backends.name_of(be))

    with _InPlace(x_pre, x_post, theta) as (xp_, xq_, th_):
        update_in_place(wf, geom, seed_step, kernel, be)
    return wf.w


def stdp_(w, z, x_pre, x_post, *, a_plus, a_minus, tau_plus, tau_minus, dt=1.0, lr=1.0, w_min=0.0, w_max=1.0,
          weight_dependence="additive", gate=None, mask=None, seed=0, step=None, stencil="moore", boundary="periodic",
          backend=None):
    """One step of pair-based, all-to-all, trace-form STDP (SPEC §4), in place.

    In order::

        x_pre  ← x_pre · exp(−dt/τ₊) ;  x_post ← x_post · exp(−dt/τ₋)
        Δw[k,i] = lr · mean_b(gate·(A₊·F₊(w)·x_pre[b,nbr(i,k)]·z[b,i] − A₋·F₋(w)·z[b,nbr(i,k)]·x_post[b,i]))
        w ← clamp(w + Δw, w_min, w_max)      (live synapses only)
        x_pre += z ;  x_post += z

    ``additive``: F₊ = F₋ = 1; ``multiplicative``: F₊ = w_max − w, F₋ = w − w_min.
    Masked synapses and synapses to cells outside a ``zero`` boundary never change.

    Args:
        w: weights ``[K, D, H, W]``, any float dtype; updated in place.
        z: spikes ``[B, D, H, W]``, bool or float.
        x_pre, x_post: traces ``[B, D, H, W]`` (one float dtype); updated in place.
        a_plus, a_minus: A₊, A₋.
        tau_plus, tau_minus: τ₊, τ₋ > 0, in the units of ``dt``.
        dt: the step length > 0. Default: 1.
        lr: η. Default: 1.
        w_min, w_max: weight bounds. Default: 0, 1.
        weight_dependence: ``"additive"`` or ``"multiplicative"``. Default: additive.
        gate: optional ``[B, D, H, W]`` (bool or float): each sample's update is
            multiplied by it before the batch mean. Default: None.
        mask: optional bool ``[K, D, H, W]``, False = pruned (or a packed
            int32 mask, or the ELL ``idx``; see the module). Default: None.
        seed: the seed of the stochastic rounding of fp16/bf16 ``w``. Default: 0.
        step: its step counter; None takes a process-wide counter. Default: None.
        stencil, boundary, backend: as in :func:`cellkern.ops.aggregate`.

    Returns:
        ``w``.

    Example:
        >>> import torch, cellkern as ck
        >>> w = torch.full((26, 4, 4, 4), 0.5)
        >>> st = ck.PlasticityState.create((4, 4, 4), batch=1)
        >>> z = torch.ones(1, 4, 4, 4)
        >>> _ = ck.ops.stdp_(w, z, st.x_pre, st.x_post, a_plus=0.1, a_minus=0.05, tau_plus=20, tau_minus=20)
        >>> float(st.x_pre[0, 0, 0, 0])
        1.0
    """
    op = "stdp_"
    geom, dims, be, wf = _begin(op, w, mask, stencil, boundary, backend)
    B = validation.check_cells(op, "x_pre", x_pre, dims, wf.w)
    validation.check_cells(op, "x_post", x_post, dims, wf.w, batch=B)
    validation.check_cells(op, "z", z, dims, wf.w, batch=B, allow_bool=True)
    validation.check_cells(op, "gate", gate, dims, wf.w, batch=B, allow_bool=True, allow_none=True)
    seed_step = rounding_counter(op, seed, step)
    sd = _same_dtype(op, [("x_pre", x_pre), ("x_post", x_post)])
    tp = validation.check_real(op, "tau_plus", tau_plus, positive=True)
    tm = validation.check_real(op, "tau_minus", tau_minus, positive=True)
    dt = validation.check_real(op, "dt", dt, positive=True)
    lr = validation.check_real(op, "lr", lr)
    w_min, w_max = validation.check_bounds(op, "w_min", w_min, "w_max", w_max)
    wd = validation.check_choice(op, "weight_dependence", weight_dependence, WEIGHT_DEPENDENCES)
    p = PlasticityParams(
        stdp=True, a_plus=lr * validation.check_real(op, "a_plus", a_plus), a_minus=lr * validation.check_real(op, "a_minus", a_minus),
        decay_pre=math.exp(-dt / tp), decay_post=math.exp(-dt / tm), multiplicative=wd == "multiplicative",
        w_min=w_min, w_max=w_max)
    _run(be, wf, geom, p, seed_step, spikes=_cast(z, sd), x_pre=x_pre, x_post=x_post, gate=_cast(gate, sd))
    return w


def bcm_(w, y, theta, *, lr, tau_theta, decay=0.0, w_min=0.0, w_max=1.0, theta_min=0.0, theta_max=float("inf"),
         gate=None, mask=None, seed=0, step=None, stencil="moore", boundary="periodic", backend=None):
    """One step of sliding-threshold BCM (SPEC §4), in place.

    ::

        Δw[k,i] = mean_b(gate·(lr·y[b,i]·(y[b,i] − θ[i])·y[b,nbr(i,k)] − decay·w[k,i]))
        w ← clamp(w + Δw, w_min, w_max)      (live synapses only)
        θ[i] ← clamp(θ[i] + (mean_b y[b,i]² − θ[i]) / τ_θ, θ_min, θ_max)   # after Δw

    Args:
        w: weights ``[K, D, H, W]``; updated in place.
        y: activity ``[B, D, H, W]``.
        theta: θ ``[D, H, W]``; updated in place.
        lr: η_bcm.
        tau_theta: τ_θ > 0 in steps.
        decay: ε ≥ 0. Default: 0.
        w_min, w_max: weight bounds. Default: 0, 1.
        theta_min, theta_max: θ bounds. Default: 0, inf.
        gate, mask, seed, step, stencil, boundary, backend: as in :func:`stdp_`.

    Returns:
        ``w``.

    Example:
        >>> import torch, cellkern as ck
        >>> w = torch.full((6, 3, 3, 3), 0.5); theta = torch.full((3, 3, 3), 0.01)
        >>> _ = ck.ops.bcm_(w, torch.full((1, 3, 3, 3), 0.2), theta, lr=0.1, tau_theta=10, stencil="von_neumann")
        >>> round(float(theta[0, 0, 0]), 4)
        0.013
    """
    op = "bcm_"
    geom, dims, be, wf = _begin(op, w, mask, stencil, boundary, backend)
    validation.check_cells(op, "theta", theta, dims, wf.w, per_sample=False)
    B = validation.check_cells(op, "y", y, dims, wf.w)
    validation.check_cells(op, "gate", gate, dims, wf.w, batch=B, allow_bool=True, allow_none=True)
    seed_step = rounding_counter(op, seed, step)
    lr = validation.check_real(op, "lr", lr)
    tau = validation.check_real(op, "tau_theta", tau_theta, positive=True)
    decay = validation.check_real(op, "decay", decay, nonneg=True)
    w_min, w_max = validation.check_bounds(op, "w_min", w_min, "w_max", w_max)
    t_min, t_max = validation.check_bounds(op, "theta_min", theta_min, "theta_max", theta_max, allow_inf=True)
    p = PlasticityParams(bcm=True, bcm_lr=lr, bcm_decay=decay, tau_theta=tau, theta_min=t_min, theta_max=t_max,
                         w_min=w_min, w_max=w_max)
    sd = theta.dtype
    _run(be, wf, geom, p, seed_step, y=_cast(y, sd), theta=theta, gate=_cast(gate, sd))
    return w


def plasticity_step_(w, y, state, rule, mask=None, *, lr_scale=1.0, activity_threshold=None, gate=None, seed=0,
                     step=None, stencil="moore", boundary="periodic", backend=None):
    """The fused plasticity step: every enabled rule in one read and one write of ``w`` (SPEC §4).

    In order: inhibition (y → y') → winners → spikes z = (y' > θ_act) →
    per-sample STDP + BCM terms on y' and z, summed → gate → batch mean →
    normalise (Σ_k |w[k,i]| of every cell that won in some sample back to its
    value before) → clamp to [w_min, w_max]; then the traces (decay, + z) and
    θ (from y') in place. With competition off, y' = y and every cell wins.
    Equals the reference rules run in that order.

    Args:
        w: weights ``[K, D, H, W]``, any float dtype; updated in place.
        y: activity ``[B, D, H, W]`` (see :func:`cellkern.ops.activity`).
        state: a :class:`~cellkern.PlasticityState` with batch B; updated in place.
        rule: a :class:`~cellkern.PlasticityRule`.
        mask: optional bool ``[K, D, H, W]``, False = pruned. Default: None.
        lr_scale: the learning-rate multiplier of a stage profile: a number, or
            a per-cell ``[D, H, W]`` tensor (e.g. pattern amplification,
            1 + γ·saliency). Default: 1.
        activity_threshold: θ_act; None takes ``rule.activity_threshold``. Default: None.
        gate: optional ``[B, D, H, W]``, multiplies the winners. Default: None.
        seed: the seed of the stochastic rounding of fp16/bf16 ``w``. Default: 0.
        step: its step counter; None takes ``state.step``, and the op then
            sets ``state.step`` to the step used + 1. Default: None.
        stencil, boundary, backend: as in :func:`cellkern.ops.aggregate`.

    Returns:
        ``w``.

    Example:
        >>> import torch, cellkern as ck
        >>> w = torch.full((26, 6, 6, 6), 0.5)
        >>> state = ck.PlasticityState.create((6, 6, 6), batch=2)
        >>> y = torch.rand(2, 6, 6, 6)
        >>> _ = ck.ops.plasticity_step_(w, y, state, ck.PlasticityRule(w_min=0.0, w_max=1.0))
        >>> bool((w >= 0).all() and (w <= 1).all())
        True
    """
    op = "plasticity_step_"
    if not isinstance(rule, PlasticityRule):
        raise TypeError(f"{op}: rule must be a cellkern.PlasticityRule, got {type(rule).__name__}")
    if not isinstance(state, PlasticityState):
        raise TypeError(f"{op}: state must be a cellkern.PlasticityState, got {type(state).__name__}")
    geom, dims, be, wf = _begin(op, w, mask, stencil, boundary, backend)
    B = validation.check_cells(op, "state.x_pre", state.x_pre, dims, wf.w)
    validation.check_cells(op, "state.x_post", state.x_post, dims, wf.w, batch=B)
    validation.check_cells(op, "state.theta", state.theta, dims, wf.w, per_sample=False)
    validation.check_cells(op, "y", y, dims, wf.w, batch=B)
    validation.check_cells(op, "gate", gate, dims, wf.w, batch=B, allow_bool=True, allow_none=True)
    seed_step = rounding_counter(op, seed, state.step if step is None else step)
    sd = _same_dtype(op, [("state.x_pre", state.x_pre), ("state.x_post", state.x_post),
                          ("state.theta", state.theta)])
    lr = None
    if isinstance(lr_scale, torch.Tensor):
        validation.check_cells(op, "lr_scale", lr_scale, dims, wf.w, per_sample=False)
        lr, lr_scale = _cast(lr_scale, sd), 1.0
    elif isinstance(lr_scale, bool) or not isinstance(lr_scale, numbers.Real):
        raise TypeError(f"{op}: lr_scale must be a number or a (D, H, W) tensor, got {type(lr_scale).__name__}")
    else:
        lr_scale = validation.check_real(op, "lr_scale", lr_scale)
    if activity_threshold is not None:
        activity_threshold = validation.check_real(op, "activity_threshold", activity_threshold)
    p = rule.params(lr_scale, activity_threshold)
    if not (p.stdp or p.bcm):
        return w  # nothing learns (e.g. the freeze profile)
    _run(be, wf, geom, p, seed_step, y=_cast(y, sd), x_pre=state.x_pre, x_post=state.x_post,
         theta=state.theta, gate=_cast(gate, sd), lr=lr)
    state.step = seed_step[1] + 1
    return w


def synapse_l1(w, mask=None, *, stencil="moore", boundary="periodic"):
    """``Σ_k |w[k,i]|`` over each cell's live synapses (not masked, neighbour
    inside the lattice): the quantity heterosynaptic normalisation keeps.

    Returns:
        ``[D, H, W]``, fp32 (fp64 for fp64 ``w``).
    """
    op = "synapse_l1"
    geom, dims, _, wf = _begin(op, w, mask, stencil, boundary, "reference")
    w, mask = sparse.expand_ell(wf.w, wf.idx, geom.K) if wf.idx is not None else (wf.w, wf.mask)
    acc = accumulation_dtype(w.dtype)
    return torch.where(live_synapses(mask, geom, dims, w.device), w.to(acc).abs(), 0).sum(0)


def heterosynaptic_normalize_(w, target, mask=None, *, where=None, seed=0, step=None, stencil="moore",
                              boundary="periodic", backend=None):
    """Scale each cell's live synapses so that ``Σ_k |w[k,i]| = target[i]`` (SPEC §4), in place.

    The normalisation the fused step applies after its update, as its own
    op: take ``target = synapse_l1(w)`` before an update, then call this after.
    Cells whose live Σ|w| is 0, and cells where ``where`` is False, are left as they are.

    Args:
        w: weights ``[K, D, H, W]``; updated in place.
        target: ``[D, H, W]`` float, the wanted Σ|w| per cell.
        mask: optional bool ``[K, D, H, W]``. Default: None.
        where: optional bool ``[D, H, W]``: the cells to normalise. Default: all.
        seed, step: the stochastic rounding of fp16/bf16 ``w``, as in :func:`stdp_`.
        stencil, boundary, backend: as in :func:`cellkern.ops.aggregate`.

    Returns:
        ``w``.

    Example:
        >>> import torch, cellkern as ck
        >>> w = torch.rand(6, 3, 3, 3)
        >>> _ = ck.ops.heterosynaptic_normalize_(w, torch.ones(3, 3, 3), stencil="von_neumann")
        >>> round(float(w[:, 1, 1, 1].sum()), 5)
        1.0
    """
    op = "heterosynaptic_normalize_"
    geom, dims, be, wf = _begin(op, w, mask, stencil, boundary, backend)
    validation.check_cells(op, "target", target, dims, wf.w, per_sample=False)
    if where is not None:
        validation.check_cells(op, "where", where, dims, wf.w, per_sample=False, allow_bool=True)
        if where.dtype != torch.bool:
            raise TypeError(f"{op}: where must be a bool tensor, got {where.dtype}")
    seed_step = rounding_counter(op, seed, step)
    acc = accumulation_dtype(wf.w.dtype)
    tgt, wh = _cast(target, acc), validation.contiguous(where)
    update_in_place(wf, geom, seed_step,
            lambda w_, m_: library.normalize_op(w_, m_, *geom.op_args, tgt, wh, backends.name_of(be)), be)
    return w
