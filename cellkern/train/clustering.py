"""Clustering and coordination (SPEC §6).

:func:`spherical_kmeans` groups feature vectors by cosine similarity;
:func:`cluster_cells` applies it to each cell's incoming weights (optionally
with its mean activity); :func:`coordination_factor` turns the labels into a
per-synapse factor, (1 + κ) inside a cluster and (1 − κ) across; and
:func:`coordinate_` applies that factor to the potentiation of one plasticity
step — the step's Δw, never ``w`` itself, so repeated re-clustering cannot make
the weights drift.
"""
from __future__ import annotations

import numbers

import torch

from .. import validation
from ..contract import accumulation_dtype
from ..stencil import geometry, shift

__all__ = ["spherical_kmeans", "cluster_cells", "coordination_factor", "coordinate_"]


def _pos_int(op, name, v):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"{op}: {name} must be a positive int, got {v!r}")
    return int(v)


def _unit_rows(x):
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def spherical_kmeans(x: torch.Tensor, k: int = 8, seed: int = 0, iters: int = 20) -> tuple:
    """Spherical (cosine) k-means with a seeded k-means++ start.

    Rows are normalised to unit length; each iteration assigns every row to the
    centroid of largest cosine similarity and sets each centroid to the
    normalised sum of its rows. An emptied cluster is re-seeded with the row
    farthest (lowest similarity) from its centroid. Stops after ``iters``
    iterations or when no label changes. The same ``x`` and ``seed`` give the
    same labels.

    Args:
        x: features ``[N, F]``, float.
        k: the number of clusters; ``min(k, N)`` are used. Default: 8.
        seed: seed of the k-means++ draws. Default: 0.
        iters: the largest number of iterations. Default: 20.

    Returns:
        ``(labels [N] int64 in [0, k), centroids [k, F] unit rows, fp32)``.

    Example:
        >>> import torch
        >>> from cellkern.train.clustering import spherical_kmeans
        >>> x = torch.tensor([[1.0, 0.1], [0.9, 0.0], [0.0, 1.0], [0.1, 0.8]])
        >>> spherical_kmeans(x, k=2)[0].tolist() in ([0, 0, 1, 1], [1, 1, 0, 0])
        True
    """
    op = "spherical_kmeans"
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] < 1 or x.shape[1] < 1 \
            or not x.is_floating_point():
        raise ValueError(f"{op}: x must be a float tensor (N, F) with N, F >= 1, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    k = min(_pos_int(op, "k", k), x.shape[0])
    iters = _pos_int(op, "iters", iters)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"{op}: seed must be an int, got {seed!r}")
    xn = _unit_rows(x.detach().to(torch.float32))
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    N = xn.shape[0]
    # k-means++: each next centre drawn with probability ∝ (1 − max cos)²
    first = int(torch.randint(N, (1,), generator=g, device="cpu"))
    centres = [first]
    best = xn @ xn[first]
    for _ in range(1, k):
        d2 = (1 - best).clamp_min(0).square().cpu()
        idx = int(torch.multinomial(d2, 1, generator=g)) if float(d2.sum()) > 0 else \
            int(torch.randint(N, (1,), generator=g, device="cpu"))
        centres.append(idx)
        best = torch.maximum(best, xn @ xn[idx])
    c = xn[centres].clone()
    labels = None
    for _ in range(iters):
        sim = xn @ c.T
        new = sim.argmax(1)
        counts = torch.bincount(new, minlength=k)
        for j in torch.nonzero(counts == 0).flatten().tolist():
            # re-seed with the row least similar to its own centroid (ties: the lowest index)
            own = sim.gather(1, new[:, None])[:, 0]
            far = int(torch.argmin(own))
            new[far] = j
            sim[far] = -2.0
            sim[far, j] = 2.0
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        sums = torch.zeros_like(c).index_add_(0, labels, xn)
        c = torch.where(sums.norm(dim=1, keepdim=True) > 0, _unit_rows(sums), c)
    return labels.to(torch.int64), c


def cluster_cells(w: torch.Tensor, activity=None, k: int = 8, seed: int = 0, *, mask=None,
                  iters: int = 20) -> tuple:
    """Cluster the cells by their incoming weights (SPEC §6).

    Features per cell: ``w[:, i]`` (masked synapses read 0), with the cell's
    mean activity appended when given, scaled so that its root mean square
    equals that of one weight column (so neither part drowns the other).

    Args:
        w: weights ``[K, D, H, W]``.
        activity: optional mean activity ``[D, H, W]``. Default: None.
        k, seed, iters: as in :func:`spherical_kmeans`. Default: 8, 0, 20.
        mask: optional bool ``[K, D, H, W]``. Default: None.

    Returns:
        ``(labels [D, H, W] int64, centroids [k, K or K + 1])``.
    """
    op = "cluster_cells"
    validation.check_tensor(op, "w", w)
    if w.dim() != 4 or not w.is_floating_point():
        raise ValueError(f"{op}: w must be a float tensor (K, D, H, W), got shape {tuple(w.shape)} of {w.dtype}")
    K, dims = w.shape[0], tuple(w.shape[1:])
    feats = w.detach().to(torch.float32)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != w.shape:
            raise ValueError(f"{op}: mask must be a bool tensor shaped like w {tuple(w.shape)}, got "
                             f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        feats = feats * mask
    feats = feats.reshape(K, -1).T
    if activity is not None:
        if not isinstance(activity, torch.Tensor) or tuple(activity.shape) != dims:
            raise ValueError(f"{op}: activity must have shape (D, H, W) = {dims}, got "
                             f"{tuple(activity.shape) if isinstance(activity, torch.Tensor) else type(activity).__name__}")
        a = activity.detach().to(torch.float32).reshape(-1, 1)
        a_rms, w_rms = a.square().mean().sqrt(), feats.square().mean().sqrt()
        feats = torch.cat([feats, a * (w_rms / a_rms) if a_rms > 0 else a], 1)
    labels, centroids = spherical_kmeans(feats, k=k, seed=seed, iters=iters)
    return labels.view(dims), centroids


def coordination_factor(labels: torch.Tensor, kappa: float, *, stencil="moore", boundary="periodic") -> torch.Tensor:
    """Per-synapse LTP factor: ``1 + κ`` where cell ``i`` and ``nbr(i, k)`` share
    a cluster, ``1 − κ`` across clusters, 1 where the neighbour lies outside a
    ``zero`` boundary (such synapses never change anyway).

    Args:
        labels: cluster labels ``[D, H, W]`` (integer).
        kappa: κ in [0, 1].
        stencil, boundary: as in :func:`cellkern.ops.aggregate`.

    Returns:
        ``[K, D, H, W]`` float32.

    Example:
        >>> import torch
        >>> from cellkern.train.clustering import coordination_factor
        >>> f = coordination_factor(torch.zeros(3, 3, 3, dtype=torch.long), 0.2, stencil="von_neumann")
        >>> f.shape, float(f.min()), float(f.max())
        (torch.Size([6, 3, 3, 3]), 1.2000000476837158, 1.2000000476837158)
    """
    op = "coordination_factor"
    geom = geometry(op, stencil, boundary)
    if not isinstance(labels, torch.Tensor) or labels.dim() != 3 or labels.is_floating_point() \
            or labels.dtype == torch.bool:
        raise ValueError(f"{op}: labels must be an integer tensor (D, H, W), got "
                         f"{(tuple(labels.shape), labels.dtype) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    kappa = validation.check_real(op, "kappa", kappa, nonneg=True)
    if kappa > 1:
        raise ValueError(f"{op}: kappa must be in [0, 1] (1 − κ scales cross-cluster LTP), got {kappa}")
    out = torch.empty((geom.K,) + tuple(labels.shape), dtype=torch.float32, device=labels.device)
    for k, o in enumerate(geom.offsets):
        nb, valid = shift(labels, o, geom.periodic)
        same = (nb == labels).to(torch.float32)
        out[k] = torch.where(valid, 1 - kappa + 2 * kappa * same, torch.ones_like(same))
    return out


def coordinate_(w: torch.Tensor, w_before: torch.Tensor, factor: torch.Tensor, *, w_min: float, w_max: float,
                mask=None) -> torch.Tensor:
    """Scale one step's potentiation by ``factor``, in place on ``w``.

    With ``Δw = w − w_before`` (the change of the step just taken)::

        w = clamp(w_before + Δw · factor, w_min, w_max)   where Δw > 0 (LTP) and not masked
        w unchanged                                      elsewhere (Δw ≤ 0 or masked)

    Only Δw is scaled, never ``w``: a call after a step that changed nothing
    changes nothing.

    Args:
        w: weights after the step ``[K, D, H, W]``; updated in place.
        w_before: the weights before the step, same shape and dtype.
        factor: ``[K, D, H, W]`` (e.g. :func:`coordination_factor`), or broadcastable to it.
        w_min, w_max: the bounds of the rule.
        mask: optional bool ``[K, D, H, W]``; False synapses are left alone. Default: None.

    Returns:
        ``w``.
    """
    op = "coordinate_"
    for name, t in (("w", w), ("w_before", w_before), ("factor", factor)):
        validation.check_tensor(op, name, t)
    if w.dim() != 4 or not w.is_floating_point():
        raise ValueError(f"{op}: w must be a float tensor (K, D, H, W), got shape {tuple(w.shape)} of {w.dtype}")
    if w_before.shape != w.shape or w_before.dtype != w.dtype:
        raise ValueError(f"{op}: w_before must match w ({tuple(w.shape)}, {w.dtype}), "
                         f"got ({tuple(w_before.shape)}, {w_before.dtype})")
    try:
        torch.broadcast_shapes(factor.shape, w.shape)
    except RuntimeError:
        raise ValueError(f"{op}: factor must be broadcastable to {tuple(w.shape)}, got {tuple(factor.shape)}") from None
    lo, hi = validation.check_bounds(op, "w_min", w_min, "w_max", w_max)
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != w.shape):
        raise ValueError(f"{op}: mask must be a bool tensor shaped like w {tuple(w.shape)}, got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    acc = accumulation_dtype(w.dtype)
    before = w_before.to(acc)
    dw = w.to(acc) - before
    ltp = dw > 0
    if mask is not None:
        ltp &= mask
    scaled = (before + dw * factor.to(acc)).clamp(lo, hi)
    w.copy_(torch.where(ltp, scaled.to(w.dtype), w))
    return w
