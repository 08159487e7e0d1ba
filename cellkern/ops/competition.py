"""Activity and competition (SPEC §3, §4): per-cell ops, no autograd."""
from __future__ import annotations


from .. import backends
from . import library
from .. import validation
from ..contract import accumulation_dtype
from ..stencil import geometry

__all__ = ["activity", "lateral_inhibition", "local_winners"]

ACTIVITY_MODES = ("change", "state")


def activity(s_prev, s, mode="change"):
    """The scalar activity per cell and sample that plasticity works on (SPEC §3).

    ``change``: ``y[b,i] = mean_c |s[b,c,i] − s_prev[b,c,i]|``; ``state``: ``y = s[:, 0]``.

    Args:
        s_prev: the state before the update ``[B, C, D, H, W]`` (unused for ``state``).
        s: the state after ``[B, C, D, H, W]``.
        mode: ``"change"`` or ``"state"``. Default: ``"change"``.

    Returns:
        ``y`` ``[B, D, H, W]`` in the dtype of ``s``.

    Example:
        >>> import torch, cellkern as ck
        >>> s0 = torch.zeros(1, 4, 3, 3, 3); s1 = s0 + 0.5
        >>> ck.ops.activity(s0, s1)[0, 0, 0, 0].item()
        0.5
    """
    op = "activity"
    mode = validation.check_choice(op, "mode", mode, ACTIVITY_MODES)
    validation.check_state(op, s)
    if mode == "state":
        return s[:, 0]
    validation.check_state(op, s_prev, "s_prev")
    if s_prev.shape != s.shape:
        raise ValueError(f"{op}: s_prev must have the shape of s {tuple(s.shape)}, got {tuple(s_prev.shape)}")
    validation.check_same(op, "s_prev", s_prev, s)
    acc = accumulation_dtype(s.dtype)
    return (s.to(acc) - s_prev.to(acc)).abs().mean(1).to(s.dtype)


def _cells(op, y, stencil, boundary, backend):
    geom = geometry(op, stencil, boundary)
    validation.check_tensor(op, "y", y)
    if y.dim() != 4:
        raise ValueError(f"{op}: y must have shape (B, D, H, W) (4 dims), got {tuple(y.shape)}")
    if y.dtype not in validation.FLOAT_DTYPES:
        raise TypeError(f"{op}: y must be float16, bfloat16, float32 or float64, got {y.dtype}")
    if y.numel() == 0:
        raise ValueError(f"{op}: y must have no empty dim, got shape {tuple(y.shape)}")
    _, be = backends.select(backend, y.device, op)
    return geom, be, validation.contiguous(y)


def lateral_inhibition(y, *, beta, stencil="moore", boundary="periodic", backend=None):
    """Subtract a share of the neighbours' mean activity (SPEC §4).

    ``y'[b,i] = relu(y[b,i] − β · mean_k y[b,nbr(i,k)])``; neighbours outside
    a ``zero`` boundary read as 0 (the mean still divides by K).

    Args:
        y: activity ``[B, D, H, W]``.
        beta: β ≥ 0.
        stencil, boundary, backend: as in :func:`cellkern.ops.aggregate`.

    Returns:
        ``y'`` ``[B, D, H, W]`` in the dtype of ``y``.

    Example:
        >>> import torch, cellkern as ck
        >>> y = torch.zeros(1, 5, 5, 5); y[0, 2, 2, 2] = 1.0
        >>> ck.ops.lateral_inhibition(y, beta=1.0)[0, 2, 2, 2].item()
        1.0
    """
    op = "lateral_inhibition"
    beta = validation.check_real(op, "beta", beta, nonneg=True)
    geom, be, y = _cells(op, y, stencil, boundary, backend)
    return library.lateral_inhibition_op(y, beta, *geom.op_args, backends.name_of(be))


def local_winners(y, threshold, *, stencil="moore", boundary="periodic", backend=None):
    """The cells that win their neighbourhood (SPEC §4).

    ``win[b,i] = y[b,i] > threshold  and  y[b,i] ≥ max_k y[b,nbr(i,k)]``;
    neighbours outside a ``zero`` boundary read as 0.

    Args:
        y: activity ``[B, D, H, W]`` (usually after :func:`lateral_inhibition`).
        threshold: θ_act.
        stencil, boundary, backend: as in :func:`cellkern.ops.aggregate`.

    Returns:
        bool ``[B, D, H, W]``.

    Example:
        >>> import torch, cellkern as ck
        >>> y = torch.zeros(1, 5, 5, 5); y[0, 2, 2, 2] = 1.0
        >>> int(ck.ops.local_winners(y, 0.5).sum())
        1
    """
    op = "local_winners"
    threshold = validation.check_real(op, "threshold", threshold)
    geom, be, y = _cells(op, y, stencil, boundary, backend)
    return library.local_winners_op(y, threshold, *geom.op_args, backends.name_of(be))
