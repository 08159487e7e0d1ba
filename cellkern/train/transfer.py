"""Transfer between stages (SPEC §8): what a stage hands to the next, resampled to the new dims.

The weights per offset and θ by trilinear interpolation, the mask by nearest
neighbour; traces start at zero and the stencil is kept.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as functional

__all__ = ["resample_field", "resample_mask", "transfer"]


def resample_field(f: torch.Tensor, dims) -> torch.Tensor:
    """Trilinear resampling of ``[..., D, H, W]`` to ``[..., *dims]``
    (align_corners=True: the faces stay on the faces)."""
    dims = tuple(int(d) for d in dims)
    if tuple(f.shape[-3:]) == dims:
        return f.clone()
    lead = f.shape[:-3]
    x = f.reshape(-1, 1, *f.shape[-3:]).to(torch.float32)
    out = functional.interpolate(x, size=dims, mode="trilinear", align_corners=True)
    return out.reshape(*lead, *dims).to(f.dtype)


def resample_mask(mask: torch.Tensor, dims) -> torch.Tensor:
    """Nearest-neighbour resampling of a bool mask ``[K, D, H, W]``."""
    dims = tuple(int(d) for d in dims)
    if tuple(mask.shape[-3:]) == dims:
        return mask.clone()
    out = functional.interpolate(mask[:, None].to(torch.float32), size=dims, mode="nearest")
    return out[:, 0] > 0.5


def transfer(w: torch.Tensor, theta: torch.Tensor, mask: Optional[torch.Tensor], dims, *, w_min: float,
             w_max: float):
    """``(w, θ, mask)`` of a stage carried to a lattice of ``dims`` (SPEC §8).

    Args:
        w: weights ``[K, D, H, W]``, resampled per offset (trilinear).
        theta: θ ``[D, H, W]`` (trilinear).
        mask: bool ``[K, D, H, W]`` or None (nearest).
        dims: the new ``(D, H, W)``.
        w_min, w_max: the weight bounds (interpolation stays inside them; the
            clamp only guards rounding).

    Returns:
        ``(w', θ', mask')`` at ``dims``.

    Example:
        >>> import torch
        >>> from cellkern.train.transfer import transfer
        >>> w2, t2, m2 = transfer(torch.rand(26, 4, 4, 4), torch.rand(4, 4, 4), None, (6, 6, 6),
        ...                       w_min=0.0, w_max=1.0)
        >>> tuple(w2.shape), m2
        ((26, 6, 6, 6), None)
    """
    w2 = resample_field(w, dims).clamp_(w_min, w_max)
    t2 = resample_field(theta, dims)
    m2 = None if mask is None else resample_mask(mask, dims)
    return w2.contiguous(), t2.contiguous(), m2
