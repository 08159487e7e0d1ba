"""Plasticity rules and state (SPEC §4, §8): plain dataclasses.

A :class:`PlasticityRule` bundles the three local rules (each may be ``None``,
i.e. off) with the bounds and the activity threshold; a
:class:`PlasticityState` holds what the rules carry from step to step (the
STDP traces and the BCM threshold θ). :meth:`PlasticityRule.params` flattens a
rule into the :class:`PlasticityParams` every backend takes.

Defaults are the base rule parameters of the schedule (SPEC §8): STDP lr 0.01,
A₊ = A₋ = 0.01, τ₊ = τ₋ = 20 steps, weights in [0.1, 2.0], BCM τ_θ = 1000
steps with θ in [0.001, 0.5]. SPEC §8 fixes no BCM learning rate or
inhibition strength; we take BCM lr 0.01 and β = 0.5.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Optional

import torch

from .validation import check_real

__all__ = ["STDP", "BCM", "Competition", "PlasticityRule", "PlasticityState", "PlasticityParams", "CompetitiveHebbian"]

WEIGHT_DEPENDENCES = ("additive", "multiplicative")


@dataclass(frozen=True)
class STDP:
    """Pair-based, all-to-all STDP in trace form (SPEC §4).

    ``Δw = lr · mean_b(A₊·F₊(w)·x_pre[nbr]·z[i] − A₋·F₋(w)·z[nbr]·x_post[i])``

    Args:
        lr: η. Default: 0.01.
        a_plus, a_minus: A₊, A₋. Default: 0.01 each.
        tau_plus, tau_minus: trace time constants τ₊, τ₋ in steps. Default: 20.
        weight_dependence: ``"additive"`` (F = 1) or ``"multiplicative"``
            (soft bounds F₊ = w_max − w, F₋ = w − w_min). Default: additive.
    """

    lr: float = 0.01
    a_plus: float = 0.01
    a_minus: float = 0.01
    tau_plus: float = 20.0
    tau_minus: float = 20.0
    weight_dependence: str = "additive"

    def __post_init__(self):
        for n in ("lr", "a_plus", "a_minus"):
            check_real("STDP", n, getattr(self, n))
        for n in ("tau_plus", "tau_minus"):
            check_real("STDP", n, getattr(self, n), positive=True)
        if self.weight_dependence not in WEIGHT_DEPENDENCES:
            raise ValueError(f"STDP: weight_dependence must be one of {', '.join(WEIGHT_DEPENDENCES)}, "
                             f"got {self.weight_dependence!r}")


@dataclass(frozen=True)
class BCM:
    """Sliding-threshold BCM (SPEC §4).

    ``Δw = lr · mean_b(y[i]·(y[i] − θ[i])·y[nbr]) − decay·w``, then
    ``θ ← clamp(θ + (mean_b y² − θ)/τ_θ, θ_min, θ_max)``.

    Args:
        lr: η_bcm. Default: 0.01.
        tau_theta: τ_θ in steps. Default: 1000.
        decay: ε, weight decay per step. Default: 0.
        theta_min, theta_max: bounds of θ. Default: 0.001, 0.5.
    """

    lr: float = 0.01
    tau_theta: float = 1000.0
    decay: float = 0.0
    theta_min: float = 0.001
    theta_max: float = 0.5

    def __post_init__(self):
        check_real("BCM", "lr", self.lr)
        check_real("BCM", "tau_theta", self.tau_theta, positive=True)
        check_real("BCM", "decay", self.decay, nonneg=True)
        lo = check_real("BCM", "theta_min", self.theta_min, allow_inf=True)
        hi = check_real("BCM", "theta_max", self.theta_max, allow_inf=True)
        if lo > hi:
            raise ValueError(f"BCM: theta_min must be <= theta_max, got {lo} > {hi}")


@dataclass(frozen=True)
class Competition:
    """Winner-take-all with lateral inhibition (SPEC §4).

    ``y' = relu(y − β·mean_k y[nbr])``; a cell wins where ``y' > θ_act`` and
    ``y' ≥ max_k y'[nbr]``; only winners learn.

    Args:
        beta: β, the inhibition strength. Default: 0.5.
    """

    beta: float = 0.5

    def __post_init__(self):
        check_real("Competition", "beta", self.beta, nonneg=True)


@dataclass(frozen=True)
class PlasticityParams:
    """The flat, numeric form of a rule that every backend takes (no defaults
    are applied here; build it with :meth:`PlasticityRule.params` or the ops).

    ``a_plus``/``a_minus`` are η·A₊/η·A₋ and ``bcm_lr``/``bcm_decay`` are
    η_bcm/ε, each already multiplied by the learning-rate multiplier;
    ``decay_pre``/``decay_post`` are exp(−dt/τ₊)/exp(−dt/τ₋).
    """

    stdp: bool = False
    a_plus: float = 0.0
    a_minus: float = 0.0
    decay_pre: float = 1.0
    decay_post: float = 1.0
    multiplicative: bool = False
    bcm: bool = False
    bcm_lr: float = 0.0
    bcm_decay: float = 0.0
    tau_theta: float = 1.0
    theta_min: float = 0.0
    theta_max: float = math.inf
    competition: bool = False
    beta: float = 0.0
    threshold: float = 0.0
    normalize: bool = False
    w_min: float = 0.0
    w_max: float = 1.0


@dataclass(frozen=True)
class PlasticityRule:
    """The rules of one fused :func:`cellkern.ops.plasticity_step_`.

    Args:
        stdp: an :class:`STDP`, or None (off). Default: ``STDP()``.
        bcm: a :class:`BCM`, or None (off). Default: ``BCM()``.
        competition: a :class:`Competition`, or None (off: y' = y, every cell
            wins). Default: ``Competition()``.
        normalize: heterosynaptic normalisation — after the update, Σ_k |w[k,i]|
            of every updated cell is scaled back to its value before. Default: True.
        activity_threshold: θ_act, the spike and winner threshold. Default: 0.01.
        dt: the step length in the units of τ₊, τ₋. Default: 1.
        w_min, w_max: the weight bounds every update ends with. Default: 0.1, 2.0.

    Example:
        >>> import cellkern as ck
        >>> rule = ck.PlasticityRule(bcm=None, competition=ck.Competition(beta=0.3))
        >>> rule.params(lr_scale=0.5).a_plus
        5e-05
    """

    stdp: Optional[STDP] = field(default_factory=STDP)
    bcm: Optional[BCM] = field(default_factory=BCM)
    competition: Optional[Competition] = field(default_factory=Competition)
    normalize: bool = True
    activity_threshold: float = 0.01
    dt: float = 1.0
    w_min: float = 0.1
    w_max: float = 2.0

    def __post_init__(self):
        for name, cls in (("stdp", STDP), ("bcm", BCM), ("competition", Competition)):
            v = getattr(self, name)
            if v is not None and not isinstance(v, cls):
                raise TypeError(f"PlasticityRule: {name} must be a {cls.__name__} or None, got {type(v).__name__}")
        if not isinstance(self.normalize, bool):
            raise TypeError(f"PlasticityRule: normalize must be a bool, got {type(self.normalize).__name__}")
        check_real("PlasticityRule", "activity_threshold", self.activity_threshold)
        check_real("PlasticityRule", "dt", self.dt, positive=True)
        lo = check_real("PlasticityRule", "w_min", self.w_min)
        hi = check_real("PlasticityRule", "w_max", self.w_max)
        if lo > hi:
            raise ValueError(f"PlasticityRule: w_min must be <= w_max, got {lo} > {hi}")

    def params(self, lr_scale: float = 1.0, activity_threshold: Optional[float] = None) -> PlasticityParams:
        """The flat parameters, with every learning rate times ``lr_scale`` and
        θ_act replaced by ``activity_threshold`` when given (stage profiles
        scale both, SPEC §8)."""
        m = check_real("PlasticityRule.params", "lr_scale", lr_scale)
        thr = self.activity_threshold if activity_threshold is None else activity_threshold
        thr = check_real("PlasticityRule.params", "activity_threshold", thr)
        kw = dict(threshold=thr, normalize=self.normalize, w_min=float(self.w_min), w_max=float(self.w_max))
        if self.stdp is not None:
            s = self.stdp
            kw.update(stdp=True, a_plus=m * s.lr * s.a_plus, a_minus=m * s.lr * s.a_minus,
                      decay_pre=math.exp(-self.dt / s.tau_plus), decay_post=math.exp(-self.dt / s.tau_minus),
                      multiplicative=s.weight_dependence == "multiplicative")
        if self.bcm is not None:
            b = self.bcm
            kw.update(bcm=True, bcm_lr=m * b.lr, bcm_decay=m * b.decay, tau_theta=float(b.tau_theta),
                      theta_min=float(b.theta_min), theta_max=float(b.theta_max))
        if self.competition is not None:
            kw.update(competition=True, beta=float(self.competition.beta))
        return PlasticityParams(**kw)


#: θ₀, the BCM threshold's start value (SPEC §4: never 0)
THETA0 = 0.01


@dataclass
class PlasticityState:
    """What the rules carry between steps: STDP traces and the BCM threshold.

    Attributes:
        x_pre, x_post: traces ``[B, D, H, W]``.
        theta: θ ``[D, H, W]``.
        step: the steps taken, counted by :func:`cellkern.ops.plasticity_step_`
            (the counter of its stochastic rounding of fp16/bf16 weights). Default: 0.

    Build it with :meth:`create`. The ops update the tensors in place.
    """

    x_pre: torch.Tensor
    x_post: torch.Tensor
    theta: torch.Tensor
    step: int = 0

    @classmethod
    def create(cls, dims, batch: int = 1, *, theta0: float = THETA0, dtype=torch.float32,
               device=None) -> "PlasticityState":
        """Zero traces and θ = θ₀ everywhere (never 0: a threshold that starts
        at 0 makes every cell potentiate).

        Args:
            dims: lattice dims ``(D, H, W)``.
            batch: B. Default: 1.
            theta0: θ₀ > 0. Default: 0.01.
            dtype: the state dtype. Default: float32.
            device: Default: CPU.
        """
        dims = tuple(dims) if isinstance(dims, (tuple, list, torch.Size)) else dims
        if not (isinstance(dims, tuple) and len(dims) == 3 and all(
                isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in dims)):
            raise ValueError(f"PlasticityState.create: dims must be 3 positive ints (D, H, W), got {dims!r}")
        if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1:
            raise ValueError(f"PlasticityState.create: batch must be a positive int, got {batch!r}")
        t0 = check_real("PlasticityState.create", "theta0", theta0, positive=True)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"PlasticityState.create: dtype must be a floating torch.dtype, got {dtype!r}")
        shape = (int(batch),) + tuple(int(d) for d in dims)
        return cls(
            x_pre=torch.zeros(shape, dtype=dtype, device=device),
            x_post=torch.zeros(shape, dtype=dtype, device=device),
            theta=torch.full(shape[1:], t0, dtype=dtype, device=device),
        )

    def to(self, *args, **kwargs) -> "PlasticityState":
        """A copy with every tensor moved/cast like ``Tensor.to``."""
        return PlasticityState(self.x_pre.to(*args, **kwargs), self.x_post.to(*args, **kwargs),
                               self.theta.to(*args, **kwargs), self.step)


@dataclass(frozen=True)
class CompetitiveHebbian:
    """The competitive Hebbian rule of the mixing form (SPEC §11): soft
    winner-take-all among a cell's ``C_out`` units, Oja-normalised, with a
    homeostatic threshold β (see :func:`cellkern.ops.competitive_hebbian_step_`).

    Args:
        eta: η. Default: 0.01.
        tau: τ, the softmax temperature; 0 is hard winner-take-all. Default: 0.1.
        eta_beta: η_β, the homeostatic rate. Default: 0.01.
        average: ``"wins"`` (n = 1 + Σ_b p) or ``"batch"`` (n = B). Default: ``"wins"``.
    """

    eta: float = 0.01
    tau: float = 0.1
    eta_beta: float = 0.01
    average: str = "wins"

    def __post_init__(self):
        for n in ("eta", "tau", "eta_beta"):
            check_real("CompetitiveHebbian", n, getattr(self, n), nonneg=True)
        if self.average not in ("wins", "batch"):
            raise ValueError(f"CompetitiveHebbian: average must be one of wins, batch, got {self.average!r}")
