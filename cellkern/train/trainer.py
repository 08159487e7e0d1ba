"""The main job: run a staged schedule on the fused ops (SPEC §6–§9).

Each stage, top to bottom:

1. the memory budget check (dims that do not fit are reduced along
   ``ck.PROGRESSION`` and the log says so);
2. transfer — weights per offset, θ and mask resampled from the previous
   stage (or fresh weights), traces reset — then pruning when ``sparse_keep < 1``
   (each cell keeps its largest ``floor(keep·K_cell + 1/2)`` of its ``K_cell`` in-lattice synapses —
   ``ck.sparse.prune(..., of="stencil")`` — scaled up to the cell's Σ|w|);
3. ``steps`` lattice steps. Every ``present_steps`` steps a new batch of B
   training images drives the input face from the zero state. One step is
   ``s' = propagate(s, w, mask, x)``, then, unless the profile is ``freeze``,
   ``plasticity_step_(w, y, …)`` on ``y = activity(s, s')`` (the channel mean
   of |s' − s|, SPEC §3) with lr × profile multiplier (× (1 + γ·saliency)
   with emergence tracking) and, with clustering, the step's potentiation
   rescaled by the cluster coordination factors;
4. every ``cluster_every`` steps re-clustering; every ``monitor_every``
   steps the monitor (decoder accuracy, emergence metrics, activity, step
   time, synapse-updates/s, memory), timed apart from training; every
   ``checkpoint_every`` steps and at the stage end an atomic checkpoint.

A killed run resumed from its checkpoint ends with exactly the weights of an
uninterrupted run: every random draw comes from generators whose state is saved.
SIGTERM or SIGINT (Ctrl-C) during :meth:`Trainer.run` of a one-process run
writes a checkpoint at the next step boundary and raises
:class:`RunInterrupted` (``cellkern run`` exits with 128 + the signal number);
a second signal stops at once. The run folder is locked
(:class:`~cellkern.checkpoint.RunLock`) while a trainer uses it.

Every tensor of the run lives on ``device`` (the config key, or ``cellkern run
--device``): weights, mask, traces, θ, cluster factors, lr amplification,
state, drive, data batches and decoder features. The random draws come from
CPU generators and move to the device afterwards, so a run draws the same
numbers on any device, and a checkpoint (saved as it is, loaded onto the CPU)
resumes on either device. The monitor's decoder keeps its small buffer of
features on the CPU (a float64 ridge solve of a few hundred samples).

``parallel="data"`` / ``"domain"`` runs the same loop on several processes
(``torchrun``; :mod:`cellkern.train.layouts` lays the tensors out and runs the ops),
ending with exactly the one-process run's state.
"""
from __future__ import annotations

import math
import pathlib
import signal
import threading
import time
from typing import Callable, Optional

import torch
import click

from .. import ops, sparse
from .checkpoint import CHECKPOINT_NAME, CheckpointError, RunLock, load_checkpoint, save_checkpoint
from .planning import fit_stage, resolve_device, stage_estimate
from .config import ScheduleConfig, load_config, save_config
from .layouts import make_layout
from .monitor import BOUNDARY, PrequentialDecoder, Presentation, check_reach, drive
from ..rules import PlasticityState
from .config import make_rule, profile
from .transfer import transfer
from ..stencil import geometry, live_synapses
from ..stencil import stencil as make_stencil

__all__ = ["Trainer", "RunInterrupted", "prune_stage", "rescale_survivors"]

CONFIG_NAME = "config.toml"


def prune_stage(w: torch.Tensor, mask: Optional[torch.Tensor], keep: float, *, stencil: str, w_min: float,
                w_max: float) -> tuple:
    """``(w, mask)`` of a stage's pruning (``sparse_keep``): each cell keeps
    ``keep`` of its stencil's in-lattice synapses (``ck.sparse.prune`` with
    ``of="stencil"``, so consecutive stages with 0.3 keep 30% of the stencil,
    not 30% of 30%), the survivors rescaled to the cell's Σ|w| before."""
    kw = dict(of="stencil", stencil=stencil, boundary=BOUNDARY)
    if w.dim() == 6:  # the mixing form prunes by synapse: the norm of its C × C matrix; survivors keep their values
        score = w.norm(dim=(1, 2))
        return w, sparse.prune(score, mask, keep, **kw)
    new = sparse.prune(w, mask, keep, **kw)
    old = sparse.prune(w, mask, 1.0, **kw)   # the live synapses before
    return rescale_survivors(w, old, new, w_min, w_max), new


def rescale_survivors(w: torch.Tensor, live_before: torch.Tensor, live_after: torch.Tensor, w_min: float,
                      w_max: float) -> torch.Tensor:
    """Scale each cell's surviving synapses so that its Σ|w| is what it was
    before pruning (then clamp to the bounds): pruning removes synapses, not
    input strength, so the signal still crosses the lattice (SPEC §4's
    heterosynaptic balance, applied to the cut)."""
    before = torch.where(live_before, w.abs(), 0).sum(0)
    after = torch.where(live_after, w.abs(), 0).sum(0)
    scale = torch.where(after > 0, before / after.clamp(min=1e-30), 1.0)
    return torch.where(live_after, w * scale, w).clamp_(w_min, w_max)


def load_dataset(cfg: ScheduleConfig):
    """The run's data: ``"digits"`` (bundled with scikit-learn) or an IDX image file
    with its labels (``data_labels``, or MNIST's naming: ``images`` → ``labels``);
    for ``task = "qa"`` the (question, answer) pairs of :func:`cellkern.train.text.load_qa`."""
    from . import data

    if cfg.task == "qa":
        from .text import load_qa

        return load_qa(cfg.data, seed=cfg.seed)
    if cfg.data == "digits":
        return data.load_digits(seed=cfg.seed)
    return data.load_idx(cfg.data, cfg.data_labels, seed=cfg.seed)


def _echo(message: str) -> None:
    click.echo(message, err=True)


class progress_bar:
    """A stage's progress bar (``click.progressbar`` on standard error: steps,
    rate and ETA; drawn only on a terminal), or nothing when ``enabled`` is False."""

    def __init__(self, total: int, initial: int, label: str, enabled: bool):
        self.bar = None
        if enabled:
            self.bar = click.progressbar(length=total, label=label, show_pos=True, show_eta=True,
                                         file=click.get_text_stream("stderr"))
            self.bar.__enter__()
            self.bar.update(initial)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def _peak_rss() -> Optional[int]:
    """The process's peak resident set in bytes (None where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class RunInterrupted(Exception):
    """The run stopped on a signal after checkpointing at a step boundary;
    ``exit_status`` is the conventional 128 + signal number."""

    def __init__(self, signum: int, out):
        name = signal.Signals(signum).name
        where = (f"checkpoint written to {str(out)!r}; continue with `cellkern run --resume {out}`"
                 if out is not None else "no run folder, nothing saved")
        super().__init__(f"stopped by {name} at a step boundary: {where}")
        self.signum, self.exit_status = signum, 128 + signum


class Trainer:
    """Runs a :class:`~cellkern.config.ScheduleConfig` (see the module docstring).

    Args:
        config: the schedule.
        out: the run's folder (config, checkpoints, report, plots); None keeps
            nothing on disk. Default: None.
        log: where log lines go. Default: :func:`click.echo` (standard error).
        progress: show a progress bar per stage. Default: True.
        stop_after: stop (as if killed) after this many steps in all; for tests. Default: None.
        parallel: ``None`` (one process), ``"data"`` (data parallel) or ``"domain"``
            (the lattice split along z) across the processes of an initialised
            ``torch.distributed`` group, e.g. under ``torchrun`` (see
            :mod:`cellkern.train.layouts`): the result equals the one-process run;
            only rank 0 logs and writes files. Default: None.

    Example:
        >>> import cellkern as ck
        >>> from cellkern.train.config import ScheduleConfig, StageConfig
        >>> cfg = ScheduleConfig(stages=[StageConfig("a", (6, 8, 8), 20)], batch=4, present_steps=5)
        >>> report = ck.Trainer(cfg, progress=False, log=lambda m: None).run()  # doctest: +SKIP
    """

    def __init__(self, config: ScheduleConfig, out=None, *, log: Callable = _echo, progress: bool = True,
                 stop_after: Optional[int] = None, parallel: Optional[str] = None):
        self.cfg = config.validate()
        self.device = resolve_device(self.cfg.device)
        if parallel is not None and self.device.type != "cpu":
            raise ValueError(f"Trainer: parallel={parallel!r} runs its processes on the CPU (gloo); "
                             f"config: device must be \"cpu\", got {self.cfg.device!r}")
        if parallel is not None and self.cfg.model == "mixing":
            raise ValueError(f"Trainer: parallel={parallel!r} runs the shared model only; config: model is 'mixing'")
        if parallel is not None and self.cfg.features != "face":
            raise ValueError(f"Trainer: parallel={parallel!r} reads the output face only; config: features must be "
                             f"\"face\", got {self.cfg.features!r}")
        self.par = make_layout(parallel, self.cfg)
        self.out = None if out is None else pathlib.Path(out)
        self.log, self.progress, self.stop_after = log, progress, stop_after
        if not self.par.is_writer:
            self.log, self.progress = (lambda msg: None), False
        self.data = load_dataset(self.cfg)
        self.gen = torch.Generator(device="cpu").manual_seed(self.cfg.seed)
        self.stage, self.step, self.started, self.done_steps = 0, 0, False, 0
        self.w = self.mask = self.pstate = self.s = self.x = self.batch_y = None
        self.clusters = self.factor = self.lr_amplification = self.y_prev = None
        self.w_initial = self.beta = self.pres = None
        self.records: list = []
        self.decoder = None
        self.qa = None  # the text task (task = "qa"): encoder, readout, optimiser, its stage loop
        if self.cfg.task == "qa":
            from .qa import QATask

            self.qa = QATask(self.cfg, self.data, parallel)
        self._parallel, self._signal, self._lock = parallel, None, None
        if self.out is not None and self.par.is_writer:
            self._lock = RunLock(self.out).acquire()   # before anything is written into the folder
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.out / CONFIG_NAME)

    @classmethod
    def resume(cls, out, device=None, **kwargs) -> "Trainer":
        """The trainer of the run in ``out``, at its last checkpoint (from the
        start when it was killed before its first checkpoint); ``device``
        overrides the run's config (a GPU run continues on the CPU and back)."""
        out = pathlib.Path(out)
        if not (out / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"resume: {str(out)!r} holds no run (no {CONFIG_NAME})")
        cfg = load_config(out / CONFIG_NAME)
        if device is not None:
            cfg.device = device
        t = cls(cfg, out, **kwargs)
        if not (out / CHECKPOINT_NAME).is_file():
            t.log(f"resumed {out}: no checkpoint yet, starting from the beginning")
            return t
        try:
            t.load_state_dict(load_checkpoint(out))
        except BaseException:
            t.close()
            raise
        t.log(f"resumed {out} at stage {min(t.stage + 1, len(t.cfg.stages))}, step {t.step}")
        return t

    # -- state ---------------------------------------------------------------------------------
    _TENSORS = ("w", "mask", "s", "x", "batch_y", "clusters", "factor", "lr_amplification", "y_prev", "w_initial",
                "beta")
    _VALUES = ("stage", "step", "started", "done_steps", "records", "decoder")

    def state_dict(self) -> dict:
        """The run's state in the one-process layout (in a multi-process run a
        collective: every rank must call it)."""
        sharded = getattr(self.par, "sharded", False)
        self.par.unshard(self)
        d = {k: getattr(self, k) for k in self._TENSORS + self._VALUES}
        d["pstate"] = None if self.pstate is None else vars(self.pstate).copy()
        d["decoder"] = None if self.decoder is None else self.decoder.state_dict()
        d["gen"] = self.gen.get_state()
        d["presentation"] = None if self.pres is None else vars(self.pres).copy()
        d["qa"] = None if self.qa is None else self.qa.state_dict()
        if sharded:
            self.par.shard(self)
        return d

    def load_state_dict(self, d: dict) -> None:
        """Load a :meth:`state_dict`; its tensors move to the run's device."""
        def here(v):
            return v.to(self.device) if isinstance(v, torch.Tensor) else v

        where = f" of {str(self.out / CHECKPOINT_NAME)!r}" if self.out is not None else ""
        missing = [k for k in self._TENSORS + self._VALUES + ("pstate", "gen") if k not in d]
        if missing:
            raise CheckpointError(f"resume: the checkpoint{where} is not a checkpoint of this cellkern version: "
                                  f"missing {', '.join(missing)}")
        try:
            for k in self._TENSORS + self._VALUES:
                setattr(self, k, here(d[k]) if k in self._TENSORS else d[k])
            self.decoder = None if d["decoder"] is None else PrequentialDecoder.from_state_dict(d["decoder"])
            self.pstate = None if d["pstate"] is None else PlasticityState(**{k: here(v) for k, v in
                                                                              d["pstate"].items()})
            self.gen.set_state(d["gen"])
            self.pres = None
            if d.get("presentation") is not None:
                self.pres = Presentation(d["presentation"]["steps"], d["presentation"]["features"])
                vars(self.pres).update({k: here(v) for k, v in d["presentation"].items()})
            if self.qa is not None:
                self.qa.load_state_dict(d["qa"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"resume: the checkpoint{where} does not hold a valid run state "
                                  f"({type(exc).__name__}: {exc})") from None

    def close(self) -> None:
        """Release the run folder (also done when :meth:`run` returns or raises)."""
        if self._lock is not None:
            self._lock.release()

    def checkpoint(self) -> Optional[pathlib.Path]:
        if self.out is None:
            return None
        state = self.state_dict()
        return save_checkpoint(self.out, state) if self.par.is_writer else None

    # -- stage set-up --------------------------------------------------------------------------
    def _fresh_weights(self, dims, seed) -> torch.Tensor:
        """Shared model: uniform in [w_min, w_min + w_init]. Mixing model (SPEC §11): zero-mean normal
        ``[K, C, C, D, H, W]`` with std ``init_gain / sqrt(K_live · C)``, ``K_live`` the offsets the
        connectivity keeps."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        cfg, r = self.cfg, self.cfg.rule
        st = make_stencil(cfg.stencil)
        if cfg.model == "mixing":
            C = cfg.channels
            k_live = sum(1 for o in st.offset_tuples if cfg.connectivity == "full" or o[0] == -1)
            std = cfg.init_gain / math.sqrt(max(k_live, 1) * C)
            return (std * torch.randn((st.K, C, C, *dims), generator=g, device="cpu")).to(self.device)
        return (r.w_min + r.w_init * torch.rand((st.K, *dims), generator=g, device="cpu")).to(self.device)

    def _connectivity(self, dims) -> Optional[torch.Tensor]:
        """The bool ``[K, D, H, W]`` mask of ``connectivity = "feedforward"`` (offsets with dz = −1), else None."""
        if self.cfg.connectivity == "full":
            return None
        ff = torch.tensor([o[0] == -1 for o in make_stencil(self.cfg.stencil).offset_tuples], device=self.device)
        return ff.view(-1, 1, 1, 1).expand(-1, *dims).contiguous()

    def start_stage(self) -> None:
        cfg, st = self.cfg, self.cfg.stages[self.stage]
        dims = fit_stage(cfg, st, log=self.log)
        r, mixing = cfg.rule, cfg.model == "mixing"
        if self.device.type == "cuda":  # the stage's measured peak (_held_bytes) is its own
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.w is None or not st.transfer_learning:
            w = self._fresh_weights(dims, cfg.seed * 1000 + self.stage)
            theta, mask = None, None
            if self.w_initial is None:
                self.w_initial = w.clone()
        else:
            mask = self.mask
            if mask is not None:  # synapses outside the lattice count as live, or a face layer's void moves inward
                mask = mask | ~live_synapses(None, geometry("trainer", self.cfg.stencil, BOUNDARY),
                                             tuple(self.w.shape[-3:]), self.w.device)
            if mixing:  # signed weights, β resampled like θ
                w, theta, mask = transfer(self.w, self.beta, mask, dims, w_min=-math.inf, w_max=math.inf)
            else:
                w, theta, mask = transfer(self.w, self.pstate.theta, mask, dims, w_min=r.w_min, w_max=r.w_max)
        conn = self._connectivity(dims)
        if conn is not None:
            mask = conn if mask is None else mask & conn
        if mixing:
            self.pstate = None
            self.beta = torch.zeros((cfg.channels, *dims), device=self.device) if theta is None else theta
        else:
            self.pstate = PlasticityState.create(dims, cfg.batch, theta0=r.theta0, device=self.device)  # traces reset
            if theta is not None:
                self.pstate.theta.copy_(theta)
        if st.sparse_keep < 1:
            w, mask = prune_stage(w, mask, st.sparse_keep, stencil=cfg.stencil, w_min=r.w_min, w_max=r.w_max)
        if mask is None and not st.memory_optimizations:
            mask = torch.ones_like(w, dtype=torch.bool)
        elif mask is not None and st.memory_optimizations and bool(mask.all()):
            mask = None
        self.w, self.mask = w.contiguous(), mask
        self.s = self.x = self.batch_y = self.y_prev = None
        self.clusters = self.factor = self.lr_amplification = None
        self.decoder = PrequentialDecoder(cfg.decoder_buffer, cfg.decoder_alpha, self.data.n_classes)
        self.records.append(dict(
            name=st.name, requested_dims=list(st.dims), dims=list(dims), steps=st.steps,
            profile=st.plasticity_profile, keep=st.sparse_keep, seconds=0.0, train_seconds=0.0,
            monitor_seconds=0.0, estimated_memory_bytes=stage_estimate(cfg, st, dims), history=[], cluster_sizes=[],
            transferred=bool(st.transfer_learning and self.stage > 0), max_abs_feature=0.0, reach_step=0,
            presentations_read=0))
        self.started = True
        self.log(f"stage {self.stage + 1}/{len(cfg.stages)} {st.name}: {'x'.join(map(str, dims))}, "
                 f"profile {st.plasticity_profile}, keep {st.sparse_keep}, "
                 f"{'transferred' if self.records[-1]['transferred'] else 'fresh'} weights")

    # -- one stage -----------------------------------------------------------------------------
    def _present(self, dims) -> None:
        from .data import to_face

        N = self.data.train_x.shape[0]
        idx = torch.randint(0, N, (self.cfg.batch,), generator=self.gen, device="cpu")
        faces = to_face(self.data.train_x[idx].to(self.device), dims[1], dims[2])
        mode = "channel0" if self.cfg.model == "mixing" else "gain"
        self.x = self.par.local_input(drive(faces, self.cfg.channels, dims[0], self.cfg.input_gain, mode))
        self.s = torch.zeros_like(self.x)
        self.pres = Presentation(self.cfg.present_steps, self.cfg.features)
        self.batch_y = self.data.train_y[idx].to(self.device)

    def run_stage(self) -> bool:
        """Run the current stage to its end; False when stopped by ``stop_after``."""
        if self.qa is not None:
            return self.qa.run_stage(self)
        cfg, st = self.cfg, self.cfg.stages[self.stage]
        if not self.started:
            self.start_stage()
        rec = self.records[-1]
        dims = tuple(rec["dims"])
        prof = profile(st.plasticity_profile)
        mixing = cfg.model == "mixing"
        rule = make_rule(cfg.rule, prof, st.activity_threshold)
        thr = rule.activity_threshold
        kw = dict(stencil=cfg.stencil, boundary=BOUNDARY)
        n_syn = self._live_count()
        self.par.shard(self)
        bar = progress_bar(st.steps, self.step, f"stage {self.stage + 1}/{len(cfg.stages)} {st.name} "
                           f"{'x'.join(map(str, dims))}", self.progress)
        t_stage = time.perf_counter()
        with torch.no_grad():
            while self.step < st.steps:
                if self._signal is not None:
                    bar.close()
                    self.par.unshard(self)
                    self._interrupted()
                if self.stop_after is not None and self.done_steps >= self.stop_after:
                    bar.close()
                    self.par.unshard(self)
                    return False
                t0 = time.perf_counter()
                if self.step % cfg.present_steps == 0 or self.s is None:
                    self._present(dims)
                s_new = self.par.propagate(self, self.s, self.x, leak=cfg.leak, activation=cfg.activation, **kw)
                y = ops.activity(self.s, s_new)
                self.pres.observe(s_new)
                end = (self.step + 1) % cfg.present_steps == 0
                if mixing and end and prof.lr_multiplier > 0:  # once per presentation, on its settled state
                    h = cfg.hebbian
                    ops.competitive_hebbian_step_(self.w, s_new, self.beta, eta=h.eta * prof.lr_multiplier,
                                                  tau=h.tau * prof.tau_scale, eta_beta=h.eta_beta * prof.lr_multiplier,
                                                  average=h.average, mask=self.mask, **kw)
                elif not mixing and prof.lr_multiplier > 0:
                    lr = prof.lr_multiplier if self.lr_amplification is None else prof.lr_multiplier * self.lr_amplification
                    w_before = self.w.clone() if self.factor is not None else None
                    self.par.plasticity_step_(self, y, rule, lr_scale=lr, activity_threshold=thr, **kw)
                    if w_before is not None:
                        from .clustering import coordinate_

                        coordinate_(self.w, w_before, self.factor, w_min=cfg.rule.w_min, w_max=cfg.rule.w_max,
                                    mask=self.mask)
                self.s = s_new
                self.step += 1
                self.done_steps += 1
                if end and st.decoder_monitoring:
                    feats = self.par.features(self.s) if cfg.features == "face" else self.pres.features_of(self.s)
                    rec["max_abs_feature"] = max(rec["max_abs_feature"], float(feats.abs().max()))
                    rec["presentations_read"] += 1
                    reach = self.pres.reach
                    rec["reach_step"] = None if reach is None or rec["reach_step"] is None else max(
                        rec["reach_step"], reach)
                    self.decoder.observe(feats, self.batch_y)
                if st.clustering_enabled and self.step % cfg.cluster_every == 0:
                    self._recluster(y, rec)
                rec["train_seconds"] += time.perf_counter() - t0
                if self.step % cfg.monitor_every == 0 or self.step == st.steps:
                    self._monitor(st, y, thr, n_syn, rec)
                self.y_prev = y
                bar.update(1)
                if cfg.checkpoint_every and self.done_steps % cfg.checkpoint_every == 0 and self.step < st.steps:
                    self.checkpoint()
        bar.close()
        self.par.unshard(self)
        rec["seconds"] += time.perf_counter() - t_stage
        rec["parallel"] = self.par.describe()
        rec["synapse_updates_per_s"] = n_syn * cfg.batch * st.steps / max(rec["train_seconds"], 1e-12)
        rec["live_synapses"] = n_syn
        rec["peak_memory_bytes"] = self._held_bytes()
        rec["process_peak_rss_bytes"] = _peak_rss()
        rec["_activity_slice"] = None if self.y_prev is None else self.y_prev.mean(0)[dims[0] // 2].tolist()
        rec["_cluster_slice"] = None if self.clusters is None else self.clusters[dims[0] // 2].tolist()
        late = [h for h in rec["history"][len(rec["history"]) // 2:] if h.get("decoder_accuracy") is not None]
        n = sum(h["decoder_samples"] for h in late)
        rec["decoder_accuracy"] = sum(h["decoder_accuracy"] * h["decoder_samples"] for h in late) / n if n else None
        if st.decoder_monitoring and rec["presentations_read"]:  # a stage shorter than a presentation reads nothing
            check_reach(f"stage {self.stage + 1} ({st.name})", rec["max_abs_feature"], rec["reach_step"],
                        cfg.present_steps)
        self.stage, self.step, self.started = self.stage + 1, 0, False
        self.checkpoint()
        return True

    def _live_count(self) -> int:
        dims = tuple(self.w.shape[-3:])
        live = live_synapses(self.mask, geometry("trainer", self.cfg.stencil, BOUNDARY), dims, self.w.device)
        pairs = self.w.shape[1] * self.w.shape[2] if self.w.dim() == 6 else 1  # channel pairs per synapse
        return int(live.sum()) * pairs

    def _held_bytes(self) -> int:
        """Measured bytes of the stage's tensors: on CPU the live tensors it
        holds (state, drive, weights, mask, traces, θ, cluster factors, lr
        scale) plus one step's s'; on CUDA ``torch.cuda.max_memory_allocated``.
        (``process_peak_rss_bytes`` in the report is the whole process's peak.)"""
        ts = [self.w, self.mask, self.s, self.x, self.factor, self.lr_amplification, self.clusters, self.y_prev,
              self.beta] + ([] if self.pstate is None else [self.pstate.x_pre, self.pstate.x_post, self.pstate.theta])
        held = sum(t.numel() * t.element_size() for t in ts if t is not None)
        if self.w.is_cuda:
            return int(torch.cuda.max_memory_allocated(self.w.device))
        return int(held + (0 if self.s is None else self.s.numel() * self.s.element_size()))

    def _recluster(self, y, rec) -> None:
        from .clustering import cluster_cells, coordination_factor

        w, mask = self.par.full_weights(self)
        labels, _ = cluster_cells(w, activity=self.par.full_activity(y).mean(0), k=self.cfg.clusters,
                                  seed=self.cfg.seed + self.done_steps, mask=mask)
        self.clusters = labels
        self.factor = self.par.synapses(coordination_factor(labels, self.cfg.kappa, stencil=self.cfg.stencil,
                                                            boundary=BOUNDARY))
        rec["cluster_sizes"].append(dict(step=self.step, sizes=torch.bincount(labels.flatten(),
                                                                             minlength=self.cfg.clusters).tolist()))

    def _monitor(self, st, y, thr, n_syn, rec) -> None:
        """One monitor point (SPEC §9), timed as monitor overhead."""
        t0 = time.perf_counter()
        y = self.par.full_activity(y)
        h = dict(step=self.step, activity=float(y.mean()), step_seconds=rec["train_seconds"] / max(self.step, 1))
        h["synapse_updates_per_s"] = n_syn * self.cfg.batch / max(h["step_seconds"], 1e-12)
        h["memory_bytes"] = self._held_bytes()
        if st.decoder_monitoring:
            h["decoder_accuracy"], h["decoder_samples"] = self.decoder.evaluate()
        if st.emergence_tracking:
            from .emergence import branching_ratio, emergence_metrics, saliency, weight_field

            w, mask = self.par.full_weights(self)
            field = weight_field(w.norm(dim=(1, 2)) if w.dim() == 6 else w, mask)
            h["weights"] = {k: float(v) for k, v in emergence_metrics(field).items()}
            h["activity_field"] = {k: float(v) for k, v in emergence_metrics(y.mean(0).float()).items()}
            if self.y_prev is not None:
                h["branching_ratio"] = float(branching_ratio(self.par.full_activity(self.y_prev) > thr, y > thr))
            if self.cfg.amplification > 0:
                self.lr_amplification = (1.0 + self.cfg.amplification * saliency(field)).to(torch.float32).contiguous()
        rec["history"].append(h)
        rec["monitor_seconds"] += time.perf_counter() - t0

    # -- the run -------------------------------------------------------------------------------
    def run(self) -> Optional[dict]:
        """Run every remaining stage, evaluate, write the report; None when stopped early.

        Raises:
            RunInterrupted: SIGTERM/SIGINT arrived (a checkpoint was written first).
            CheckpointError: a checkpoint could not be written (the previous one is intact).
        """
        if self._lock is not None:
            self._lock.acquire()                  # again, after an earlier run() returned
        previous = self._catch_signals()
        try:
            while self.stage < len(self.cfg.stages):
                if self._signal is not None:
                    self._interrupted()
                if not self.run_stage():
                    return None
            if self._signal is not None:
                self._interrupted()
            from .report import build_report, write_report

            report = build_report(self) if self.par.is_writer else None
            if self.out is not None and self.par.is_writer:
                write_report(report, self, self.out, log=self.log)
            if self._signal is not None:          # arrived during the report: not swallowed
                raise RunInterrupted(self._signal, self.out)
            return self.par.broadcast_object(report)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)
            self.close()

    def _catch_signals(self) -> dict:
        """Route SIGTERM/SIGINT to a flag read at step boundaries (one-process
        runs in the main thread; a signal the process ignores stays ignored).
        Returns the handlers to restore."""
        if self._parallel is not None or threading.current_thread() is not threading.main_thread():
            return {}

        def on_signal(signum, frame):
            if self._signal is not None:    # a second signal: stop now
                raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
            self._signal = signum
            self.log(f"{signal.Signals(signum).name}: stopping at the next step boundary after a checkpoint")

        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, on_signal)
        return previous

    def _interrupted(self):
        self.checkpoint()
        raise RunInterrupted(self._signal, self.out)
