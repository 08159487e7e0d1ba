"""The mixing form (SPEC §11): its checks, its backend choice, the ``triangle``
epilogue of the shared form and the competitive Hebbian step.

``ck.ops.aggregate`` / ``propagate`` / ``propagate_steps`` tell the form by
``w.dim()`` (4: shared, 6: mixing) and call into this module for the mixing
form's checks; :func:`competitive_hebbian_step_` is its plasticity op.

Backends: a backend module with ``MIXING = True`` has the mixing kernels
(reference, triton; cpu and cuda when built with them). When no backend was
forced (``backend=None`` and no ``$CELLKERN_BACKEND``) and the fastest one for
the device has none, the next in ``backends.PREFERENCE`` that has them runs
(the reference at last); a forced backend without them is a ``ValueError``.
The ELL form and the mixing form do not combine (a ``ValueError``).
"""
from __future__ import annotations

import os

import torch

from .. import backends
from .. import sparse
from ..contract import accumulation_dtype
from ..stencil import geometry
from . import library
from .. import validation

__all__ = ["competitive_hebbian_step_", "is_mixing", "check_form", "mixing_weights", "select", "triangle_update"]

AVERAGES = ("wins", "batch")


def is_mixing(w) -> bool:
    """True for the mixing form: a tensor ``w`` of 6 dims."""
    return isinstance(w, torch.Tensor) and w.dim() == 6


def check_form(op: str, w, K: int, dims) -> None:
    """A tensor ``w`` has 4 dims (shared form) or 6 (mixing form)."""
    if isinstance(w, torch.Tensor) and w.dim() not in (4, 6):
        raise ValueError(f"{op}: w must have shape (K, D, H, W) = {(K,) + tuple(dims)}, got {tuple(w.shape)} "
                         f"({w.dim()} dims; the mixing form is (K, C_out, C_in, D, H, W), 6 dims)")


def mixing_weights(op: str, w, mask, K: int, s, *, square: bool, name: str = "s") -> tuple:
    """Check a mixing-form ``w`` ``[K, C_out, C_in, D, H, W]`` against the state
    ``s`` ``[B, C_in, D, H, W]`` (``C_out = C_in`` when ``square``); returns
    ``(w, mask)`` with a packed int32 mask unpacked to bool ``[K, D, H, W]``."""
    _, C_in, *dims = s.shape
    dims = tuple(dims)
    shape = tuple(w.shape)
    if shape[0] != K or shape[2] != C_in or shape[3:] != dims or (square and shape[1] != C_in):
        want = f"(K, C_out, C_in, D, H, W) = ({K}, {C_in if square else 'C_out'}, {C_in}, {', '.join(map(str, dims))})"
        why = (f" (C_in = {shape[2]} must equal the channels of {name}, {C_in})" if shape[2] != C_in else
               f" (propagate needs C_out = C_in = {C_in}, got C_out = {shape[1]})" if square and shape[1] != C_in
               else "")
        raise ValueError(f"{op}: w must have shape {want}, got {shape}{why}")
    if shape[1] < 1:
        raise ValueError(f"{op}: w must have C_out >= 1, got shape {shape}")
    validation.check_weight_dtype(op, "w", w, s)
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.uint8:
        raise ValueError(f"{op}: the ELL form (a uint8 idx as mask) is shared-form only; the mixing form takes a "
                         f"bool (K, D, H, W) or packed int32 (D, H, W) mask")
    mask = sparse.dense_mask(op, mask, K, dims, s.device)
    validation.check_mask(op, mask, K, s)
    return w, mask


def select(backend, device: torch.device, op: str) -> str:
    """The name of the backend that runs the mixing form of ``op`` on ``device``."""
    name, mod = backends.select(backend, device, op)
    if getattr(mod, "MIXING", False):
        return name
    if backend is not None or os.environ.get("CELLKERN_BACKEND"):
        have = [n for n in backends.available_backends()
                if backends.supports(n, device) and getattr(backends.module(n), "MIXING", False)]
        raise ValueError(f"{op}: backend {name!r} has no mixing-form kernels (w of shape (K, C_out, C_in, D, H, W)); "
                         f"backends with them for {device.type} tensors here: {', '.join(have)}")
    for cand in backends.PREFERENCE.get(device.type, ("reference",)) + ("reference",):
        mod = backends.module(cand)
        if mod is not None and backends.supports(cand, device) and getattr(mod, "MIXING", False):
            return cand
    return "reference"  # pragma: no cover - the reference has MIXING


def triangle_update(s, u, leak: float):
    """``(1-α)·s + α·relu(u − mean_c u)`` in the accumulation dtype, cast to the dtype of ``s``:
    the ``triangle`` activation of the shared form, after a kernel computed ``u`` (differentiable torch)."""
    acc = accumulation_dtype(s.dtype)
    ua = u.to(acc)
    return ((1.0 - leak) * s.to(acc) + leak * torch.relu(ua - ua.mean(dim=1, keepdim=True))).to(s.dtype)


def competitive_hebbian_step_(w, s, beta, *, eta=0.01, tau=0.1, eta_beta=0.01, average="wins", mask=None,
                              stencil="moore", boundary="periodic", seed=0, step=None, backend=None):
    """One competitive Hebbian step (SPEC §11), in place on ``w`` and ``beta``.

    With ``u = aggregate(s, w, mask)`` (the mixing aggregate, no drive or bias):

    ``p[b,o,i] = softmax_o((u[b,o,i] + β[o,i]) / τ)`` (τ = 0: the one-hot of the
    argmax, ties to the lowest ``o``),

    ``ΔW[k,o,c,i] = η/n[o,i] · Σ_b p[b,o,i]·(s[b,c,nbr(i,k)] − u[b,o,i]·W[k,o,c,i])``
    on live synapses (not masked, neighbour inside the lattice), then

    ``β[o,i] ← β[o,i] − η_β·(mean_b p[b,o,i] − 1/C_out)``.

    The second term of ΔW is Oja's: each unit's weight vector (over ``k, c``)
    tends to unit norm. fp16/bf16 weights are updated in an fp32 copy and
    rounded back stochastically with the counter ``(seed, step)``, as the
    shared-form plasticity ops do (:mod:`cellkern.ops.rounding`).

    Args:
        w: mixing weights ``[K, C_out, C_in, D, H, W]`` (updated in place), in the
            dtype of ``s`` or, for fp32/fp64 ``s``, a lower precision.
        s: the presynaptic state ``[B, C_in, D, H, W]``.
        beta: the per-unit threshold β, float32 ``[C_out, D, H, W]`` (updated in place).
        eta: η, the learning rate (≥ 0). Default: 0.01.
        tau: τ, the softmax temperature (≥ 0; 0 is hard winner-take-all). Default: 0.1.
        eta_beta: η_β, the homeostatic rate (≥ 0). Default: 0.01.
        average: ``"wins"`` (``n[o,i] = 1 + Σ_b p[b,o,i]``: a unit moves by the mean of
            the inputs it won, as in k-means) or ``"batch"`` (``n = B``). Default: ``"wins"``.
        mask: optional bool ``[K, D, H, W]`` or packed int32 ``[D, H, W]`` mask. Default: None.
        stencil, boundary: as in :func:`cellkern.ops.aggregate`. Default: ``"moore"``, ``"periodic"``.
        seed, step: the stochastic-rounding counter for fp16/bf16 ``w`` (``step`` None:
            the next of the process-wide counter). Default: 0, None.
        backend: as in :func:`cellkern.ops.aggregate`. Default: None.

    Returns:
        ``w``.

    Example:
        >>> import torch, cellkern as ck
        >>> w = torch.randn(6, 3, 2, 4, 4, 4) * 0.3
        >>> beta = torch.zeros(3, 4, 4, 4)
        >>> s = torch.rand(8, 2, 4, 4, 4)
        >>> ck.ops.competitive_hebbian_step_(w, s, beta, eta=0.05, stencil="von_neumann") is w
        True
    """
    from .plasticity import rounding_counter, update_in_place, WeightsForm
    
    op = "competitive_hebbian_step_"
    geom = geometry(op, stencil, boundary)
    validation.check_state(op, s)
    validation.check_tensor(op, "w", w)
    if w.dim() != 6:
        raise ValueError(f"{op}: w must have shape (K, C_out, C_in, D, H, W) (the mixing form), "
                         f"got {tuple(w.shape)} ({w.dim()} dims)")
    w_checked, mask = mixing_weights(op, w, mask, geom.K, s, square=False)
    C_out = w.shape[1]
    validation.check_tensor(op, "beta", beta)
    if tuple(beta.shape) != (C_out,) + tuple(s.shape[2:]):
        raise ValueError(f"{op}: beta must have shape (C_out, D, H, W) = {(C_out,) + tuple(s.shape[2:])}, "
                         f"got {tuple(beta.shape)}")
    if beta.dtype != torch.float32:
        raise TypeError(f"{op}: beta must be float32, got {beta.dtype}")
    if beta.device != w.device:
        raise ValueError(f"{op}: beta must be on the device of w ({w.device}), got {beta.device}")
    eta = validation.check_real(op, "eta", eta, nonneg=True)
    tau = validation.check_real(op, "tau", tau, nonneg=True)
    eta_beta = validation.check_real(op, "eta_beta", eta_beta, nonneg=True)
    wins = validation.check_choice(op, "average", average, AVERAGES) == "wins"
    seed_step = rounding_counter(op, seed, step)
    name = select(backend, s.device, op)
    be = backends.module(name)

    def kernel(work, m):
        # the backends take w and s in one dtype (fp32, or fp64): the wider of the two
        dtype = torch.promote_types(work.dtype, s.dtype)
        wk = work if work.dtype == dtype else work.to(dtype)
        with torch.no_grad():
            library.competitive_hebbian_op(wk, validation.contiguous(s.to(dtype)), b_work, m, *geom.op_args, eta, tau, eta_beta,
                                     wins, name)
        if wk is not work:
            work.copy_(wk)

    b_work = validation.contiguous(beta)
    update_in_place(WeightsForm(w_checked, mask, None), geom, seed_step, kernel, be)
    if b_work is not beta:
        beta.copy_(b_work)
    return w
