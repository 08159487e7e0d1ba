"""Stage profiles, the default schedule and the transfer between stages (SPEC §8).

A profile names the numeric rule parameters of a stage::

    >>> import cellkern as ck
    >>> ck.schedule.profile("learning")
    Profile(name='learning', lr_multiplier=0.5, activity_threshold=0.02, competition=0.5, tau_theta=1000.0)

``freeze`` has ``lr_multiplier = 0``: the trainer runs no plasticity step at all.

Transfer resamples what a stage hands to the next to the new dims: the weights
per offset and θ by trilinear interpolation, the mask by nearest neighbour;
traces start at zero and the stencil is kept.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .config import PROFILES, RuleConfig, StageConfig
from .rules import BCM, STDP, Competition, PlasticityRule

__all__ = ["Profile", "profile", "PROFILE_TABLE", "default_stages", "make_rule",
           "resample_field", "resample_mask", "transfer"]


@dataclass(frozen=True)
class Profile:
    """The numeric parameters behind a profile name.

    Attributes:
        lr_multiplier: scales every learning rate (0: no plasticity).
        activity_threshold: θ_act when the stage sets none.
        competition: β, the lateral inhibition strength.
        tau_theta: τ_θ of BCM, in steps.
    """

    name: str
    lr_multiplier: float
    activity_threshold: float
    competition: float
    tau_theta: float


#: discovery explores (full rate, weak competition, a fast-moving θ); later
#: profiles learn slower with stronger competition and a slower θ.
PROFILE_TABLE = {
    "discovery": Profile("discovery", 1.0, 0.01, 0.3, 500.0),
    "learning": Profile("learning", 0.5, 0.02, 0.5, 1000.0),
    "consolidation": Profile("consolidation", 0.2, 0.05, 0.8, 2000.0),
    "freeze": Profile("freeze", 0.0, 0.1, 0.8, 2000.0),
}


def profile(name: str) -> Profile:
    """The :class:`Profile` of ``name`` (``discovery``, ``learning``, ``consolidation``, ``freeze``)."""
    if name not in PROFILE_TABLE:
        raise ValueError(f"profile: name must be one of {', '.join(PROFILES)}, got {name!r}")
    return PROFILE_TABLE[name]


def default_stages() -> list:
    """The default schedule of SPEC §8 (16³ → 40×40×30), with step counts
    sized so that ``make demo`` finishes in a few minutes on two CPU cores."""
    S = StageConfig
    return [
        S("discovery", (16, 16, 16), 600, "discovery", 0.01, clustering_enabled=False, sparse_keep=1.0),
        S("learning", (20, 20, 20), 600, "learning", 0.02, clustering_enabled=False, sparse_keep=1.0),
        S("learning-clustered", (24, 24, 24), 600, "learning", 0.03, clustering_enabled=True, sparse_keep=1.0),
        S("consolidation", (24, 32, 32), 400, "consolidation", 0.05, clustering_enabled=True, sparse_keep=0.3),
        S("freeze", (30, 40, 40), 180, "freeze", 0.1, clustering_enabled=True, sparse_keep=0.3),
    ]


def make_rule(base: RuleConfig, prof: Profile, activity_threshold: Optional[float] = None) -> PlasticityRule:
    """The :class:`~cellkern.PlasticityRule` of a stage: the base rule with the
    profile's competition and τ_θ; the learning-rate multiplier is applied by
    the trainer as ``lr_scale``."""
    thr = prof.activity_threshold if activity_threshold is None else activity_threshold
    return PlasticityRule(
        stdp=STDP(lr=base.stdp_lr, a_plus=base.a_plus, a_minus=base.a_minus,
                  tau_plus=base.tau_plus, tau_minus=base.tau_minus),
        bcm=BCM(lr=base.bcm_lr, tau_theta=prof.tau_theta),
        competition=Competition(beta=prof.competition) if prof.competition > 0 else None,
        activity_threshold=thr, w_min=base.w_min, w_max=base.w_max)


def resample_field(f: torch.Tensor, dims) -> torch.Tensor:
    """Trilinear resampling of ``[..., D, H, W]`` to ``[..., *dims]``
    (align_corners=True: the faces stay on the faces)."""
    dims = tuple(int(d) for d in dims)
    if tuple(f.shape[-3:]) == dims:
        return f.clone()
    lead = f.shape[:-3]
    x = f.reshape(-1, 1, *f.shape[-3:]).to(torch.float32)
    out = F.interpolate(x, size=dims, mode="trilinear", align_corners=True)
    return out.reshape(*lead, *dims).to(f.dtype)


def resample_mask(mask: torch.Tensor, dims) -> torch.Tensor:
    """Nearest-neighbour resampling of a bool mask ``[K, D, H, W]``."""
    dims = tuple(int(d) for d in dims)
    if tuple(mask.shape[-3:]) == dims:
        return mask.clone()
    out = F.interpolate(mask[:, None].to(torch.float32), size=dims, mode="nearest")
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
        >>> import torch, cellkern as ck
        >>> w2, t2, m2 = ck.schedule.transfer(torch.rand(26, 4, 4, 4), torch.rand(4, 4, 4), None, (6, 6, 6),
        ...                                   w_min=0.0, w_max=1.0)
        >>> tuple(w2.shape), m2
        ((26, 6, 6, 6), None)
    """
    w2 = resample_field(w, dims).clamp_(w_min, w_max)
    t2 = resample_field(theta, dims)
    m2 = None if mask is None else resample_mask(mask, dims)
    return w2.contiguous(), t2.contiguous(), m2
