"""Schedule configuration (SPEC §8): dataclasses, validation, TOML/YAML files.

A run is a :class:`ScheduleConfig`: global settings (stencil, channels, seed,
data, memory budget, monitor interval, …), the base plasticity rule
(:class:`RuleConfig`) and a list of :class:`StageConfig`. A config file holds
the same structure::

    seed = 0
    data = "digits"
    [rule]
    stdp_lr = 0.01
    [[stages]]
    name = "discovery"
    dims = [16, 16, 16]
    steps = 400
    plasticity_profile = "discovery"

Unknown keys are an error that names them; missing keys take the defaults
below, so a config written for an older version keeps working. Wrong types
are a :class:`ConfigTypeError` (a ``TypeError`` that is also a ``ValueError``,
so that every bad file is a ``ValueError``) and bad values a ``ValueError``,
each naming the key, the expected and the received value; a file that does
not parse is a ``ValueError`` naming the file.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import pathlib
import tomllib
from dataclasses import dataclass, field, fields
from typing import Optional, Union

from ..rules import BCM, STDP, THETA0, Competition, PlasticityRule
from ..stencil import NAMED_STENCILS
from ..stencil import stencil as make_stencil
from .monitor import FEATURES

__all__ = ["StageConfig", "RuleConfig", "HebbianConfig", "ScheduleConfig", "ConfigTypeError", "default_config", "load_config", "save_config",
           "config_from_dict"]

#: the largest dim along an axis (int32 indices) and the most cells of a lattice:
#: 2⁴⁰ cells hold 114 TB of fp32 moore weights, beyond any device
MAX_DIM, MAX_CELLS = 2**31 - 1, 2**40
#: seeds: the trainer derives per-stage seeds as seed·1000 + stage, within torch's 64 bits
MAX_SEED = 2**53


class ConfigTypeError(TypeError, ValueError):
    """A config value of the wrong type (both a TypeError and a ValueError)."""




@dataclass(frozen=True)
class Profile:
    """The numeric parameters behind a profile name.

    Attributes:
        lr_multiplier: scales every learning rate (0: no plasticity).
        activity_threshold: θ_act when the stage sets none.
        competition: β, the lateral inhibition strength.
        tau_theta: τ_θ of BCM, in steps.
        tau_scale: scales τ of the mixing model's competitive Hebbian rule
            (a colder, harder competition as the schedule consolidates).
    """

    name: str
    lr_multiplier: float
    activity_threshold: float
    competition: float
    tau_theta: float
    tau_scale: float = 1.0


#: discovery explores (full rate, weak competition, a fast-moving θ); later
#: profiles learn slower with stronger competition and a slower θ.
PROFILE_TABLE = {
    "discovery": Profile("discovery", 1.0, 0.01, 0.3, 500.0, 1.0),
    "learning": Profile("learning", 0.5, 0.02, 0.5, 1000.0, 1.0),
    "consolidation": Profile("consolidation", 0.2, 0.05, 0.8, 2000.0, 0.5),
    "freeze": Profile("freeze", 0.0, 0.1, 0.8, 2000.0, 0.5),
}


def profile(name: str) -> Profile:
    """The :class:`Profile` of ``name`` (``discovery``, ``learning``, ``consolidation``, ``freeze``)."""
    if name not in PROFILE_TABLE:
        raise ValueError(f"profile: name must be one of {', '.join(PROFILES)}, got {name!r}")
    return PROFILE_TABLE[name]


PROFILES = tuple(PROFILE_TABLE)
#: what a run learns: image labels (SPEC §12) or question → answer text (issue 16)
TASKS = ("classify", "qa")
#: the named stencils a schedule may use (radius(r) stencils are for the ops)
SCHEDULE_STENCILS = tuple(n for n in NAMED_STENCILS if n != "radius(r)")


def _where(ctx: str, key: str) -> str:
    return f"{ctx}.{key}" if ctx else key


def _check(ctx, key, value, kind, *, positive=False, nonneg=False, unit=False, choices=None, optional=False):
    """One field's type and value check; returns the normalised value."""
    name = _where(ctx, key)
    if value is None and optional:
        return None
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigTypeError(f"config: {name} must be true or false, got {type(value).__name__} {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigTypeError(f"config: {name} must be an integer, got {type(value).__name__} {value!r}")
        value = int(value)
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigTypeError(f"config: {name} must be a number, got {type(value).__name__} {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"config: {name} must be finite, got {value!r}")
    elif kind is str:
        if not isinstance(value, str):
            raise ConfigTypeError(f"config: {name} must be a string, got {type(value).__name__} {value!r}")
    if positive and not value > 0:
        raise ValueError(f"config: {name} must be > 0, got {value!r}")
    if nonneg and not value >= 0:
        raise ValueError(f"config: {name} must be >= 0, got {value!r}")
    if unit and not 0 < value <= 1:
        raise ValueError(f"config: {name} must be in (0, 1], got {value!r}")
    if choices is not None and value not in choices:
        raise ValueError(f"config: {name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def check_dims(ctx: str, dims) -> tuple:
    """``dims`` as a tuple of 3 positive ints, or a clear error."""
    name = _where(ctx, "dims")
    if not isinstance(dims, (list, tuple)):
        raise ConfigTypeError(f"config: {name} must be a list of 3 integers [D, H, W], got {type(dims).__name__} {dims!r}")
    if len(dims) != 3:
        raise ValueError(f"config: {name} must have 3 entries [D, H, W], got {len(dims)}: {list(dims)!r}")
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, numbers.Integral):
            raise ConfigTypeError(f"config: {name} must hold integers, got {type(d).__name__} {d!r} in {list(dims)!r}")
        if d <= 0:
            raise ValueError(f"config: {name} must be positive, got {list(dims)!r}")
        if d > MAX_DIM:
            raise ValueError(f"config: {name} must be at most {MAX_DIM} along each axis, got {list(dims)!r}")
    if math.prod(int(d) for d in dims) > MAX_CELLS:
        raise ValueError(f"config: {name} must hold at most 2**40 cells, got {list(dims)!r} "
                         f"({math.prod(int(d) for d in dims):.3g} cells)")
    return tuple(int(d) for d in dims)


def check_device(device) -> str:
    """The config value ``device`` as a name (``"cpu"``, ``"cuda"``, ``"cuda:N"``,
    ``"auto"``), or a clear error; whether the GPU exists is checked when the
    run starts (:func:`cellkern.train.planning.resolve_device`), so a GPU run's
    config still loads on a CPU machine."""
    import torch

    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise TypeError(f"config: device must be a string (cpu, cuda, cuda:N or auto), got "
                        f"{type(device).__name__} {device!r}")
    if device == "auto":
        return device
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise ValueError(f"config: device must be one of cpu, cuda, cuda:N or auto, got {device!r}")
    return str(dev) if dev.type == "cuda" else "cpu"


@dataclass
class StageConfig:
    """One stage of the schedule (SPEC §8).

    Args:
        name: the stage's label in logs, report and checkpoints. Default: ``"stage"``.
        dims: lattice dims ``(D, H, W)``; z = 0 is the input face, z = D−1 the
            output face. Default: (16, 16, 16).
        steps: lattice steps (one propagation + one plasticity step each). Default: 400.
        plasticity_profile: ``discovery``, ``learning``, ``consolidation`` or
            ``freeze`` (:func:`cellkern.train.config.profile`). Default: ``"learning"``.
        activity_threshold: θ_act of the stage; None takes the profile's. Default: None.
        clustering_enabled: spherical k-means of the cells every
            ``cluster_every`` steps, and cluster-coordinated LTP (SPEC §6). Default: False.
        memory_optimizations: hold no mask while every synapse is live and
            extract features in chunks of ``batch`` samples. Default: True.
        emergence_tracking: emergence metrics at every monitor point and
            pattern amplification, lr × (1 + γ·saliency) (SPEC §7). Default: True.
        sparse_keep: at the stage start each cell keeps this share of its
            in-lattice stencil synapses, the largest by magnitude
            (``ck.sparse.prune(..., of="stencil")``); 1 keeps all. Default: 1.0.
        progressive_scaling: dims that do not fit the memory budget are reduced
            along the progression (True) or stop the run with an error (False). Default: True.
        decoder_monitoring: the ridge decoder on the output face every
            ``monitor_every`` steps (SPEC §9). Default: True.
        transfer_learning: start from the previous stage's weights, θ and mask
            resampled to the new dims (True) or from fresh weights (False). Default: True.
        gradient_lr: with ``task = "qa"``, the Adam learning rate of the
            gradient step each stage step takes (:mod:`cellkern.train.qa`); 0:
            no gradient step (plasticity only). Must be 0 for ``classify``. Default: 0.0.
    """

    name: str = "stage"
    dims: tuple = (16, 16, 16)
    steps: int = 400
    plasticity_profile: str = "learning"
    activity_threshold: Optional[float] = None
    clustering_enabled: bool = False
    memory_optimizations: bool = True
    emergence_tracking: bool = True
    sparse_keep: float = 1.0
    progressive_scaling: bool = True
    decoder_monitoring: bool = True
    transfer_learning: bool = True
    gradient_lr: float = 0.0

    def validate(self, ctx: str = "stage") -> "StageConfig":
        _check(ctx, "name", self.name, str)
        self.dims = check_dims(ctx, self.dims)
        _check(ctx, "steps", self.steps, int, positive=True)
        _check(ctx, "plasticity_profile", self.plasticity_profile, str, choices=PROFILES)
        self.activity_threshold = _check(ctx, "activity_threshold", self.activity_threshold, float, nonneg=True,
                                         optional=True)
        for key in ("clustering_enabled", "memory_optimizations", "emergence_tracking", "progressive_scaling",
                    "decoder_monitoring", "transfer_learning"):
            _check(ctx, key, getattr(self, key), bool)
        self.sparse_keep = _check(ctx, "sparse_keep", self.sparse_keep, float, unit=True)
        self.gradient_lr = _check(ctx, "gradient_lr", self.gradient_lr, float, nonneg=True)
        return self


@dataclass
class RuleConfig:
    """The base plasticity rule of the schedule (SPEC §8: the seeds' original
    configuration); stage profiles scale its learning rates.

    Args:
        stdp_lr, a_plus, a_minus, tau_plus, tau_minus: STDP η, A₊, A₋, τ₊, τ₋.
            Default: 0.01, 0.01, 0.01, 20, 20.
        bcm_lr: η_bcm. Default: 0.01.
        w_min, w_max: weight bounds. Default: 0.1, 2.0.
        w_init: initial weights are uniform in [w_min, w_min + w_init]. Default: 0.3.
        theta0: the BCM threshold's start value θ₀. Default: 0.01.
    """

    stdp_lr: float = STDP.lr
    a_plus: float = STDP.a_plus
    a_minus: float = STDP.a_minus
    tau_plus: float = STDP.tau_plus
    tau_minus: float = STDP.tau_minus
    bcm_lr: float = BCM.lr
    w_min: float = 0.1
    w_max: float = 2.0
    w_init: float = 0.3
    theta0: float = THETA0

    def validate(self, ctx: str = "rule") -> "RuleConfig":
        for f in fields(self):
            positive = f.name in ("tau_plus", "tau_minus", "theta0")
            setattr(self, f.name, _check(ctx, f.name, getattr(self, f.name), float, positive=positive,
                                         nonneg=f.name in ("w_init", "bcm_lr", "stdp_lr")))
        if self.w_min > self.w_max:
            raise ValueError(f"config: {ctx}.w_min must be <= {ctx}.w_max, got {self.w_min} > {self.w_max}")
        return self


MODELS = ("shared", "mixing")
CONNECTIVITY = ("full", "feedforward")
#: the activations a schedule may use (SPEC §2, §11)
SCHEDULE_ACTIVATIONS = ("identity", "tanh", "relu", "sigmoid", "triangle")


@dataclass
class HebbianConfig:
    """The competitive Hebbian rule of the mixing model (SPEC §11); stage
    profiles scale ``eta`` and ``eta_beta`` by their learning-rate multiplier
    and ``tau`` by their ``tau_scale``.

    Args:
        eta: η, the learning rate. Default: 0.05.
        tau: τ, the soft winner-take-all temperature (0: hard WTA). Default: 1.0.
        eta_beta: η_β, the homeostatic threshold rate. Default: 0.0.
        average: ``"wins"`` (each unit moves by the mean of the inputs it won)
            or ``"batch"``. Default: ``"wins"``.
    """

    eta: float = 0.05
    tau: float = 1.0
    eta_beta: float = 0.0
    average: str = "wins"

    def validate(self, ctx: str = "hebbian") -> "HebbianConfig":
        for key in ("eta", "tau", "eta_beta"):
            setattr(self, key, _check(ctx, key, getattr(self, key), float, nonneg=True))
        _check(ctx, "average", self.average, str, choices=("wins", "batch"))
        return self


def default_stages() -> list:
    """The default schedule of SPEC §8 (16³ → 40×40×30), with step counts
    sized so that ``make demo`` finishes in a few minutes on two CPU cores."""
    return [
        StageConfig("discovery", (16, 16, 16), 600, "discovery", 0.01, clustering_enabled=False, sparse_keep=1.0),
        StageConfig("learning", (20, 20, 20), 600, "learning", 0.02, clustering_enabled=False, sparse_keep=1.0),
        StageConfig("learning-clustered", (24, 24, 24), 600, "learning", 0.03, clustering_enabled=True, sparse_keep=1.0),
        StageConfig("consolidation", (24, 32, 32), 400, "consolidation", 0.05, clustering_enabled=True, sparse_keep=0.3),
        StageConfig("freeze", (30, 40, 40), 180, "freeze", 0.1, clustering_enabled=True, sparse_keep=0.3),
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




@dataclass
class ScheduleConfig:
    """A whole run: global settings, the base rule and the stages.

    Args:
        stages: the :class:`StageConfig` list. Default: the schedule of SPEC §8
            (:func:`default_stages`).
        stencil: ``von_neumann``, ``moore18`` or ``moore``. Default: ``"moore"``.
        channels: C, channels per cell; the input drives channel c with gain
            ``input_gain · (c + 1) / C``. Default: 4.
        seed: seeds weights, data split, sampling and clustering. Default: 0.
        data: ``"digits"`` (scikit-learn's bundled 8×8 digits) or the path of
            an IDX image file; with ``task = "qa"``: ``"qa"`` (the English
            chatterbot-corpus conversations) or a two-column ``.tsv``/``.txt``/``.csv``
            file of (question, answer) pairs. Default: ``"digits"``.
        data_labels: the IDX label file that goes with ``data``. Default: None
            (MNIST's naming: ``train-images-idx3-ubyte`` → ``train-labels-idx1-ubyte``).
        budget: the memory budget, bytes or a string such as ``"24GB"``; None
            takes the device's memory. Default: None.
        device: where the run's tensors live: ``"cpu"``, ``"cuda"`` (or
            ``"cuda:N"``; an error naming this key when torch sees no GPU) or
            ``"auto"`` (the GPU when torch sees one, else the CPU); a
            ``torch.device`` is stored as its name. Default: ``"cpu"``.
        monitor_every: steps between decoder/emergence reports (SPEC §9). Default: 50.
        batch: B, samples presented together. Default: 16.
        present_steps: T, steps each batch of inputs drives the input face from
            the zero state; the signal must reach the output face in T steps
            (about 1.5 steps per layer of depth). Default: 45.
        input_gain: the drive's scale on the input face. Default: 2.0.
        leak: α of the cell update. Default: 0.1.
        cluster_every: steps between re-clusterings. Default: 100.
        clusters: k of the k-means. Default: 8.
        kappa: κ, the cluster coordination strength. Default: 0.2.
        amplification: γ of pattern amplification. Default: 0.5.
        checkpoint_every: steps between checkpoints inside a stage (one is
            always written at each stage's end); None: stage ends only. Default: None.
        decoder_alpha: ridge α of the decoders. Default: 1.0.
        decoder_buffer: rolling buffer of the monitor, in samples. Default: 512.
        eval_samples: at most this many training samples fit the final
            decoders and at most this many test samples score them. Default: 300.
        rule: the base :class:`RuleConfig` (the shared model's rules).
        model: ``"shared"`` (one weight per synapse for all channels, the
            STDP/BCM/competition rules of SPEC §4) or ``"mixing"`` (a
            ``C × C`` matrix per synapse, SPEC §11: signed weights drawn
            zero-mean with std ``init_gain / sqrt(K_live · C)``, the image
            on channel 0 of the input face, the competitive Hebbian rule once
            per presentation on its settled state). Default: ``"shared"``
            (also for config files that do not name one); the built-in
            schedule (:func:`default_config`) is the mixing model.
        stencil: as above; the mixing model also takes ``"radius(r)"``.
        connectivity: ``"full"`` (every stencil offset) or ``"feedforward"``
            (only the offsets with dz = −1: each cell reads the slice below
            it). Default: ``"full"``.
        activation: φ of the cell update, ``identity``, ``tanh``, ``relu``,
            ``sigmoid`` or ``triangle`` (SPEC §11, C ≥ 2). Default: ``"tanh"``.
        features: what the readout reads (SPEC §12): ``"face"`` (the output
            face at the end of a presentation), ``"slices"`` (every z-slice)
            or ``"time"`` (the output face averaged over the presentation's
            last half), pooled to 8 × 8 per channel. Default: ``"face"``.
        init_gain: g of the mixing model's initial weights. Default: 1.0.
        hebbian: the mixing model's :class:`HebbianConfig`.
        task: ``"classify"`` (images → labels, the ridge readout) or ``"qa"``
            (question → answer vectors, scored by BLEU; :mod:`cellkern.train.qa`). Default: ``"classify"``.
    """

    stages: list = field(default_factory=default_stages)
    model: str = "shared"
    stencil: str = "moore"
    connectivity: str = "full"
    activation: str = "tanh"
    features: str = "face"
    init_gain: float = 1.0
    channels: int = 4
    seed: int = 0
    data: str = "digits"
    data_labels: Optional[str] = None
    budget: Union[int, str, None] = None
    device: str = "cpu"
    monitor_every: int = 50
    batch: int = 16
    present_steps: int = 45
    input_gain: float = 2.0
    leak: float = 0.1
    cluster_every: int = 100
    clusters: int = 8
    kappa: float = 0.2
    amplification: float = 0.5
    checkpoint_every: Optional[int] = None
    decoder_alpha: float = 1.0
    decoder_buffer: int = 512
    eval_samples: int = 300
    rule: RuleConfig = field(default_factory=RuleConfig)
    hebbian: HebbianConfig = field(default_factory=HebbianConfig)
    task: str = "classify"

    def validate(self) -> "ScheduleConfig":
        if not isinstance(self.stages, list) or not self.stages:
            raise ValueError(f"config: stages must be a non-empty list of stages, got {self.stages!r}")
        for i, st in enumerate(self.stages):
            if not isinstance(st, StageConfig):
                raise ConfigTypeError(f"config: stages[{i}] must be a StageConfig, got {type(st).__name__}")
            st.validate(f"stages[{i}]")
        _check("", "model", self.model, str, choices=MODELS)
        _check("", "stencil", self.stencil, str)
        if self.stencil not in SCHEDULE_STENCILS and not (self.model == "mixing" and self.stencil.startswith("radius(")):
            raise ValueError(f"config: stencil must be one of {', '.join(SCHEDULE_STENCILS)} (the mixing model also "
                             f"takes radius(r)), got {self.stencil!r}")
        try:
            make_stencil(self.stencil)
        except ValueError as exc:
            raise ValueError(f"config: stencil: {exc}") from None
        _check("", "connectivity", self.connectivity, str, choices=CONNECTIVITY)
        _check("", "activation", self.activation, str, choices=SCHEDULE_ACTIVATIONS)
        if self.activation == "triangle" and self.channels < 2:
            raise ValueError(f"config: activation 'triangle' needs channels >= 2, got channels = {self.channels}")
        _check("", "features", self.features, str, choices=FEATURES)
        self.init_gain = _check("", "init_gain", self.init_gain, float, positive=True)
        if not isinstance(self.hebbian, HebbianConfig):
            raise TypeError(f"config: hebbian must be a HebbianConfig, got {type(self.hebbian).__name__}")
        self.hebbian.validate()
        if self.model == "mixing":
            for i, st in enumerate(self.stages):
                if st.clustering_enabled:
                    raise ValueError(f"config: stages[{i}].clustering_enabled coordinates the shared model's "
                                     "potentiation; the mixing model (model = \"mixing\") has none: set it to false")
            if self.amplification > 0 and any(st.emergence_tracking for st in self.stages):
                raise ValueError("config: amplification scales the shared model's per-cell learning rate; the "
                                 f"mixing model's rule has one rate: set amplification = 0, got {self.amplification}")
        for key in ("channels", "monitor_every", "batch", "present_steps", "cluster_every", "clusters",
                    "decoder_buffer", "eval_samples"):
            _check("", key, getattr(self, key), int, positive=True)
        _check("", "seed", self.seed, int, nonneg=True)
        if self.seed > MAX_SEED:
            raise ValueError(f"config: seed must be at most 2**53, got {self.seed!r}")
        _check("", "data", self.data, str)
        _check("", "data_labels", self.data_labels, str, optional=True)
        if self.budget is not None and not isinstance(self.budget, str):
            _check("", "budget", self.budget, int, positive=True)
        self.device = check_device(self.device)
        if isinstance(self.budget, str):
            try:
                self.budget_bytes()
            except ValueError as exc:
                raise ValueError(f"config: budget: {exc}") from None
        for key in ("input_gain", "leak", "kappa", "amplification"):
            setattr(self, key, _check("", key, getattr(self, key), float, nonneg=True))
        self.decoder_alpha = _check("", "decoder_alpha", self.decoder_alpha, float, positive=True)
        if self.leak > 1:
            raise ValueError(f"config: leak must be in [0, 1], got {self.leak!r}")
        if self.kappa >= 1:
            raise ValueError(f"config: kappa must be in [0, 1), got {self.kappa!r}")
        _check("", "checkpoint_every", self.checkpoint_every, int, positive=True, optional=True)
        if not isinstance(self.rule, RuleConfig):
            raise ConfigTypeError(f"config: rule must be a RuleConfig, got {type(self.rule).__name__}")
        self.rule.validate()
        _check("", "task", self.task, str, choices=TASKS)
        self._check_task()
        return self

    def _check_task(self) -> None:
        """The task and its data agree; gradient steps only in the text task."""
        qa_data = self.data == "qa" or self.data.lower().endswith((".tsv", ".txt", ".csv"))
        if self.task == "qa" and not qa_data:
            raise ValueError(f"config: task 'qa' needs data = 'qa' (chatterbot-corpus) or a .tsv/.txt/.csv pairs "
                             f"file, got {self.data!r}")
        if self.task == "qa" and self.data_labels is not None:
            raise ValueError(f"config: data_labels is for IDX images; task 'qa' takes none, got {self.data_labels!r}")
        if self.task == "classify" and self.data == "qa":
            raise ValueError("config: data 'qa' is text; set task = 'qa'")
        for i, st in enumerate(self.stages):
            if self.task != "qa" and st.gradient_lr > 0:
                raise ValueError(f"config: stages[{i}].gradient_lr needs task = 'qa' (the classification schedule "
                                 f"learns by plasticity only), got {st.gradient_lr!r}")

    def budget_bytes(self) -> Optional[int]:
        """The budget in bytes (None: no budget given)."""
        if self.budget is None or isinstance(self.budget, int):
            return self.budget
        from ..memory import parse_bytes

        return parse_bytes(self.budget)

    def to_dict(self) -> dict:
        """A plain dict (lists for dims, no None values) that :func:`config_from_dict` reads back."""
        def clean(d):
            return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items() if v is not None}

        out = clean({f.name: getattr(self, f.name) for f in fields(self)
                     if f.name not in ("stages", "rule", "hebbian")})
        out["rule"] = clean(dataclasses.asdict(self.rule))
        out["hebbian"] = clean(dataclasses.asdict(self.hebbian))
        out["stages"] = [clean(dataclasses.asdict(s)) for s in self.stages]
        return out


def _build(cls, data, ctx: str):
    if not isinstance(data, dict):
        raise ConfigTypeError(f"config: {ctx or 'the config'} must be a table of keys, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known, key=repr)
    if unknown:
        where = f" in {ctx}" if ctx else ""
        raise ValueError(f"config: unknown key(s){where}: {', '.join(map(repr, unknown))}; "
                         f"known keys: {', '.join(sorted(known))}")
    return data


def config_from_dict(data: dict) -> ScheduleConfig:
    """A validated :class:`ScheduleConfig` from a plain dict (a parsed file).

    Missing keys take the defaults; unknown keys raise ``ValueError`` naming them.
    """
    data = dict(_build(ScheduleConfig, data, ""))
    if "rule" in data:
        data["rule"] = RuleConfig(**_build(RuleConfig, data["rule"], "rule"))
    if "hebbian" in data:
        data["hebbian"] = HebbianConfig(**_build(HebbianConfig, data["hebbian"], "hebbian"))
    if "stages" in data:
        stages = data["stages"]
        if not isinstance(stages, list):
            raise ConfigTypeError(f"config: stages must be a list of tables, got {type(stages).__name__}")
        data["stages"] = [StageConfig(**_build(StageConfig, s, f"stages[{i}]")) for i, s in enumerate(stages)]
    return ScheduleConfig(**data).validate()


def load_config(path) -> ScheduleConfig:
    """Read a schedule from a ``.toml``, ``.yaml`` or ``.yml`` file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config: no such file {str(path)!r}")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        with path.open("rb") as fh:
            try:
                data = tomllib.load(fh)
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"config: {path} is not valid TOML: {exc}") from None
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ImportError("config: YAML files need PyYAML (pip install pyyaml); TOML needs nothing") from None
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ValueError(f"config: {path} is not valid YAML: {exc}") from None
        data = {} if data is None else data
    else:
        raise ValueError(f"config: file must end in .toml, .yaml or .yml, got {str(path)!r}")
    return config_from_dict(data)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise ConfigTypeError(f"config: cannot write {type(v).__name__} {v!r} to TOML")


def save_config(config: ScheduleConfig, path) -> pathlib.Path:
    """Write ``config`` as TOML (or YAML when ``path`` ends in .yaml/.yml)."""
    path = pathlib.Path(path)
    d = config.to_dict()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        path.write_text(yaml.safe_dump(d, sort_keys=False))
        return path
    lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if k not in ("rule", "hebbian", "stages")]
    lines += ["", "[rule]"] + [f"{k} = {_toml_value(v)}" for k, v in d["rule"].items()]
    lines += ["", "[hebbian]"] + [f"{k} = {_toml_value(v)}" for k, v in d["hebbian"].items()]
    for st in d["stages"]:
        lines += ["", "[[stages]]"] + [f"{k} = {_toml_value(v)}" for k, v in st.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def default_config() -> ScheduleConfig:
    """The built-in run (``cellkern run`` without ``--config``, ``make demo``): the
    mixing model with the settings that ``python -m benchmarks.quality`` selected
    on validation as the rule that gains over its twin on every image set tried
    (its ``best`` preset; ``benchmarks/results/quality-search.md``).

    A 3 × 8 × 8 lattice at the digits' native resolution, 8 channels per cell;
    each cell reads the 3 × 3 window of the slice below it (``moore`` with
    feed-forward connectivity: the 9 offsets with dz = −1), ``triangle``
    activation, presentations of 3 steps with α = 1; the competitive Hebbian
    rule (τ = 1, η = 0.05, η_β = 0.05, updates averaged over each unit's soft
    wins) once per presentation, three epochs of the training images, then a
    frozen stage that only reads; the readout reads every slice.

    (The benchmark's ``digits`` preset — 5 × 5 windows, two layers, the face
    read — gains more on digits, but its units collapse and its output face
    falls below the 1e-3 reach of SPEC §12 after training: the trainer refuses
    to report it.)
    """
    stages = [
        StageConfig("discovery", (3, 8, 8), 378, "discovery", clustering_enabled=False, sparse_keep=1.0),
        StageConfig("freeze", (3, 8, 8), 30, "freeze", clustering_enabled=False, sparse_keep=1.0),
    ]
    return ScheduleConfig(stages=stages, model="mixing", stencil="moore", connectivity="feedforward",
                          channels=8, activation="triangle", features="slices", init_gain=1.0, batch=32,
                          present_steps=3, leak=1.0, input_gain=1.0, amplification=0.0, monitor_every=126,
                          hebbian=HebbianConfig(eta=0.05, tau=1.0, eta_beta=0.05, average="wins")).validate()
