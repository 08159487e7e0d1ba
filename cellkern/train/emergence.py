"""Emergence tracking (SPEC §7): spectra, pattern metrics and saliency of lattice fields.

A *field* is one number per cell, ``[D, H, W]``: by default the weight field
``Σ_k |w[k]|`` (:func:`weight_field`) or the mean activity. Its 3-D FFT power
spectrum (mean removed, so the constant mode carries no power) gives:

* ``spectral_entropy`` — Shannon entropy of the normalised power over the
  M non-constant modes, divided by log M: ~0 for one plane wave, ~1 for noise;
* ``dominant_wavelength`` — ``1/|k|`` of the strongest mode, ``k`` in cycles
  per cell (``torch.fft.fftfreq`` along each axis), in cells;
* ``top_m_power`` — the share of power in the ``top_m`` strongest modes (a
  real plane wave fills two: ``±k``);
* ``autocorr_length`` — the lag (in cells, radially averaged, periodic
  minimum-image distances) at which the autocorrelation ``ifft(P)/ifft(P)[0]``
  first falls below 1/e, linearly interpolated between integer radii.

A constant field has no pattern: every metric is 0. :func:`saliency` is the
field rebuilt from its ``top_m`` strongest modes, scaled to [0, 1].
"""
from __future__ import annotations

import math
import numbers

import torch

from ..contract import accumulation_dtype

__all__ = ["power_spectrum", "emergence_metrics", "branching_ratio", "saliency", "weight_field"]


def _field(op, f):
    if not isinstance(f, torch.Tensor) or f.dim() != 3 or f.numel() == 0:
        raise ValueError(f"{op}: f must be a field tensor (D, H, W), got "
                         f"{tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__}")
    if f.is_complex():
        raise ValueError(f"{op}: f must be real, got {f.dtype}")
    return f.detach().to(accumulation_dtype(f.dtype))


def _top_m(op, top_m):
    if isinstance(top_m, bool) or not isinstance(top_m, numbers.Integral) or top_m < 1:
        raise ValueError(f"{op}: top_m must be a positive int, got {top_m!r}")
    return int(top_m)


def power_spectrum(f: torch.Tensor) -> torch.Tensor:
    """``P = |fftn(f − mean f)|²`` ``[D, H, W]`` (``P[0, 0, 0] = 0``).

    Example:
        >>> import torch
        >>> from cellkern.train.emergence import power_spectrum
        >>> float(power_spectrum(torch.ones(4, 4, 4)).sum())
        0.0
    """
    f = _field("power_spectrum", f)
    return torch.fft.fftn(f - f.mean()).abs().square()


def _wavenumber(shape, device, dtype):
    """``|k|`` of every FFT mode, in cycles per cell."""
    axes = torch.meshgrid(*(torch.fft.fftfreq(n, device=device, dtype=dtype) for n in shape), indexing="ij")
    return torch.sqrt(sum(a * a for a in axes))


def _lag(shape, device, dtype):
    """The periodic minimum-image distance of every lag, in cells."""
    axes = torch.meshgrid(*(torch.minimum(torch.arange(n, device=device), n - torch.arange(n, device=device))
                            .to(dtype) for n in shape), indexing="ij")
    return torch.sqrt(sum(a * a for a in axes))


def emergence_metrics(f: torch.Tensor, top_m: int = 8) -> dict:
    """Pattern metrics of a field (SPEC §7); see the module docstring.

    Args:
        f: field ``[D, H, W]``.
        top_m: the number of strongest modes for ``top_m_power``. Default: 8.

    Returns:
        ``dict(spectral_entropy, dominant_wavelength, top_m_power, autocorr_length)`` of floats.

    Example:
        >>> import math, torch
        >>> from cellkern.train.emergence import emergence_metrics
        >>> x = torch.arange(16.0)
        >>> f = torch.cos(2 * math.pi * x / 4).expand(4, 4, 16)
        >>> round(emergence_metrics(f)["dominant_wavelength"], 6)
        4.0
    """
    op = "emergence_metrics"
    f = _field(op, f)
    m = _top_m(op, top_m)
    P = power_spectrum(f)
    total = float(P.sum())
    M = P.numel() - 1
    if total <= 0 or M < 1 or total <= 1e-12 * float(f.square().sum()):
        return dict(spectral_entropy=0.0, dominant_wavelength=0.0, top_m_power=0.0, autocorr_length=0.0)
    p = (P / total).flatten()[1:]
    nz = p[p > 0]
    entropy = float(-(nz * nz.log()).sum()) / math.log(M) if M > 1 else 0.0
    k = _wavenumber(f.shape, f.device, f.dtype).flatten()[1:]
    dominant = float(1.0 / k[int(torch.argmax(p))])
    top = float(torch.topk(p, min(m, M)).values.sum())
    C = torch.fft.ifftn(P).real
    C = (C / C.flatten()[0]).flatten()
    r = _lag(f.shape, f.device, f.dtype).flatten()
    bins = torch.round(r).long()
    n_bins = int(bins.max()) + 1
    mean_c = torch.zeros(n_bins, dtype=C.dtype, device=C.device).index_add_(0, bins, C) / torch.bincount(bins, minlength=n_bins)
    below = torch.nonzero(mean_c < math.exp(-1)).flatten()
    if len(below) == 0:
        length = float(n_bins - 1)
    else:
        j = int(below[0])
        c0, c1 = float(mean_c[j - 1]), float(mean_c[j])
        length = (j - 1) + (c0 - math.exp(-1)) / (c0 - c1)
    return dict(spectral_entropy=entropy, dominant_wavelength=dominant, top_m_power=top, autocorr_length=length)


def branching_ratio(active_t: torch.Tensor, active_t1: torch.Tensor) -> float:
    """``σ = E[active(t+1)] / E[active(t)]`` (SPEC §7): > 1 activity grows, < 1 it dies out.

    Args:
        active_t, active_t1: activity at t and t+1, ``[..., D, H, W]``, same shape;
            bool, or numbers (non-zero = active).

    Returns:
        σ (float); NaN when nothing is active at t (σ is undefined).

    Example:
        >>> import torch
        >>> from cellkern.train.emergence import branching_ratio
        >>> a = torch.zeros(10, dtype=torch.bool); b = a.clone(); a[:4] = True; b[:6] = True
        >>> branching_ratio(a.view(1, 1, 10), b.view(1, 1, 10))
        1.5
    """
    op = "branching_ratio"
    for name, t in (("active_t", active_t), ("active_t1", active_t1)):
        if not isinstance(t, torch.Tensor) or t.dim() < 3:
            raise ValueError(f"{op}: {name} must be a tensor (..., D, H, W), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if active_t.shape != active_t1.shape:
        raise ValueError(f"{op}: active_t1 must have the shape of active_t {tuple(active_t.shape)}, "
                         f"got {tuple(active_t1.shape)}")
    n0, n1 = int((active_t != 0).sum()), int((active_t1 != 0).sum())
    return n1 / n0 if n0 else float("nan")


def saliency(f: torch.Tensor, top_m: int = 8) -> torch.Tensor:
    """The field rebuilt from its ``top_m`` strongest modes, min–max scaled to [0, 1].

    The modes are those of the real FFT (``rfftn``, so a ±k pair counts once),
    the constant mode excluded; cells where the band-passed pattern peaks get
    1, its troughs 0. A field without pattern gives zeros.

    Args:
        f: field ``[D, H, W]``.
        top_m: the number of modes kept. Default: 8.

    Returns:
        ``[D, H, W]`` float32 in [0, 1] (fp64 for fp64 ``f``).
    """
    op = "saliency"
    f = _field(op, f)
    m = _top_m(op, top_m)
    F = torch.fft.rfftn(f - f.mean())
    power = F.abs().square().flatten()
    power[0] = 0
    keep = torch.zeros_like(power, dtype=torch.bool)
    keep[torch.topk(power, min(m, power.numel())).indices] = True
    keep &= power > 0
    rec = torch.fft.irfftn(torch.where(keep.view(F.shape), F, torch.zeros_like(F)), s=f.shape)
    lo, hi = rec.min(), rec.max()
    if float(hi - lo) <= 1e-12 * max(1.0, float(f.abs().max())):
        return torch.zeros_like(f)
    return ((rec - lo) / (hi - lo)).clamp(0, 1)


def weight_field(w: torch.Tensor, mask=None) -> torch.Tensor:
    """``Σ_k |w[k]|`` ``[D, H, W]`` (fp32; masked synapses count 0): the default field of SPEC §7.

    Example:
        >>> import torch
        >>> from cellkern.train.emergence import weight_field
        >>> float(weight_field(-torch.ones(6, 2, 2, 2))[0, 0, 0])
        6.0
    """
    op = "weight_field"
    if not isinstance(w, torch.Tensor) or w.dim() != 4 or not w.is_floating_point():
        raise ValueError(f"{op}: w must be a float tensor (K, D, H, W), got "
                         f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    a = w.detach().to(accumulation_dtype(w.dtype)).abs()
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != w.shape:
            raise ValueError(f"{op}: mask must be a bool tensor shaped like w {tuple(w.shape)}, got "
                             f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        a = torch.where(mask, a, torch.zeros_like(a))
    return a.sum(0)
