"""Question → answer through the lattice (``task = "qa"``): gradient stages, the BLEU monitor, the baselines.

A question's sentence vector (:class:`~cellkern.train.text.SentenceEncoder`,
256 values, unit norm) is scaled to unit RMS (× 16) and laid on the input face
as a 16 × 16 image (resampled to the face's H × W) and drives it like an
image does (:func:`cellkern.train.monitor.drive`).
A presentation runs ``present_steps`` (T) propagation steps from the zero
state; the output face, average-pooled to 16 × 16 per channel, goes through a
linear readout ``[256, C·256]`` (+ bias) to the predicted answer vector.

**One stage step** is one presentation of a batch of B training pairs, then

1. with ``gradient_lr > 0``: the loss ``mean(1 − cos(pred, answer vector))``
   is back-propagated through ``ck.ops.propagate_steps`` to the lattice
   weights and the readout, and one Adam step (lr = ``gradient_lr``, β = (0.9,
   0.999), ε = 1e-8; the moments restart each stage) moves them; the weights
   are then clamped to the rule's ``[w_min, w_max]``;
2. unless the profile is ``freeze``: one plasticity step on the activity of
   the presentation's last transition (lr × profile multiplier, × (1 + γ·saliency)
   with emergence tracking, cluster coordination with clustering) — as the
   classification trainer does, once per presentation.

So a stage is gradient-only (``freeze`` profile), plasticity-only
(``gradient_lr = 0``) or both.

**Memory** (``memory_optimizations``): on, the forward pass uses a bfloat16
copy of the fp32 master weights (the gradient flows back to the fp32 weights
through the cast) and ``propagate_steps`` keeps only every ``k = ⌈√(T−1)⌉``-th
state (``checkpoint_every = k``) and recomputes the rest in backward; off,
fp32 weights and every state kept. At the end of each gradient stage one
step is measured both ways (:func:`activation_memory`).

**Monitor** (``decoder_monitoring``, every ``monitor_every`` steps): the
readout's vectors for fixed monitoring sets (64 training and 64 held-out
pairs) are decoded by the answer bank (:class:`AnswerBank`, the training
answers' nearest neighbour by cosine) and scored by corpus BLEU
(:mod:`cellkern.train.bleu`); the log shows both and a decoded example.

**Report** (:func:`cellkern.train.qa_report.evaluate_qa`): corpus BLEU of the
lattice on every training and held-out pair next to the baselines of the same split.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from typing import Optional

import torch
import torch.nn.functional as functional

from .. import ops
from ..stencil import geometry, live_synapses
from .bleu import corpus_bleu
from .config import make_rule, profile
from .data import to_face
from .monitor import BOUNDARY, drive
from .text import ENCODER_DIM, QAData, SentenceEncoder

__all__ = ["QATask", "AnswerBank", "activation_memory", "readout_features", "MONITOR_PAIRS", "FACE"]

#: the sentence vector as an image, and the pooled output face the readout reads
FACE = (16, 16)
#: pairs of each monitoring set (training and held-out)
MONITOR_PAIRS = 64
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


def readout_features(s: torch.Tensor) -> torch.Tensor:
    """``[B, C·256]``: the output face of ``s`` ``[B, C, D, H, W]`` average-pooled to 16 × 16 per channel."""
    face = s[:, :, -1].to(torch.float32)
    if tuple(face.shape[-2:]) != FACE:
        face = functional.adaptive_avg_pool2d(face, FACE)
    return face.flatten(1)


class AnswerBank:
    """The decoder: a vector becomes the bank answer whose vector is nearest by cosine.

    Args:
        answers: the bank's texts (duplicates are dropped, first kept).
        vectors: their unit vectors ``[n, d]``, in the order of ``answers``.
    """

    def __init__(self, answers, vectors: torch.Tensor):
        keep = {}
        for i, a in enumerate(answers):
            keep.setdefault(a, i)
        self.texts = list(keep)
        self.vectors = functional.normalize(vectors[list(keep.values())].to(torch.float32), dim=1)

    def nearest(self, v: torch.Tensor) -> list:
        """Bank indices of the nearest answers to the rows of ``v`` ``[n, d]`` (lowest index on ties)."""
        return (functional.normalize(v.to(torch.float32), dim=1) @ self.vectors.T).argmax(1).tolist()

    def decode(self, v: torch.Tensor) -> list:
        return [self.texts[i] for i in self.nearest(v)]


@contextlib.contextmanager
def _quiet_fds():
    """Silence file descriptors 1 and 2 (the profiler's native start/stop lines)."""
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def activation_memory(fn, device: torch.device) -> int:
    """Peak bytes allocated by ``fn()`` above what was allocated when it started.

    On CUDA ``torch.cuda.max_memory_allocated``; on the CPU the allocator's
    running total from the ``[memory]`` events of ``torch.profiler`` with
    ``profile_memory=True`` (each event carries the total after it).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - start)
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        with _quiet_fds():
            with torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                fn()
            prof.export_chrome_trace(path)
        with open(path) as fh:
            events = [e["args"] for e in json.load(fh)["traceEvents"] if e.get("name") == "[memory]"]
    events = [e for e in events if e.get("Device Type", 0) == 0 and "Total Allocated" in e]
    if not events:
        return 0
    start = events[0]["Total Allocated"] - events[0]["Bytes"]
    return int(max(e["Total Allocated"] for e in events) - start)


def _checkpoint_every(T: int) -> int:
    return max(1, math.ceil(math.sqrt(max(T - 1, 1))))


class QATask:
    """The text task's data, readout and optimiser state, and its stage loop.

    Args:
        cfg: the validated schedule (``task = "qa"``).
        data: the pairs (:func:`cellkern.train.text.load_qa`).
        parallel: must be None (the text task runs in one process).
    """

    def __init__(self, cfg, data: QAData, parallel: Optional[str] = None):
        if parallel is not None:
            raise ValueError(f"task 'qa': parallel must be None (the text task runs in one process), got {parallel!r}")
        self.cfg, self.data = cfg, data
        self.encoder = SentenceEncoder(seed=cfg.seed).fit(data.train_q + data.train_a)
        enc = self.encoder.encode
        self.q_train, self.a_train = enc(data.train_q), enc(data.train_a)
        self.q_test, self.a_test = enc(data.test_q), enc(data.test_a)
        self.bank = AnswerBank(data.train_a, self.a_train)
        g = torch.Generator().manual_seed(cfg.seed + 1)
        self.monitor_train = torch.randperm(len(data.train_q), generator=g)[:MONITOR_PAIRS].sort().values
        self.monitor_test = torch.randperm(len(data.test_q), generator=g)[:MONITOR_PAIRS].sort().values
        F = cfg.channels * FACE[0] * FACE[1]
        self.readout_w = torch.randn(ENCODER_DIM, F, generator=g) / math.sqrt(F)
        self.readout_b = torch.zeros(ENCODER_DIM)
        self.adam: dict = {}
        self.adam_t, self.adam_stage = 0, -1
        self.loss_sum, self.loss_n = 0.0, 0

    # -- state ---------------------------------------------------------------------------------
    _STATE = ("readout_w", "readout_b", "adam", "adam_t", "adam_stage", "loss_sum", "loss_n")

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in self._STATE}

    def load_state_dict(self, d: dict) -> None:
        for k in self._STATE:
            setattr(self, k, d[k])

    # -- the model -----------------------------------------------------------------------------
    def drive(self, vectors: torch.Tensor, dims) -> torch.Tensor:
        """The drive of unit sentence vectors ``[n, 256]``: scaled by √256 to unit
        RMS per value, laid out 16 × 16, resampled to the face, × ``input_gain · (c+1)/C``."""
        faces = to_face(vectors.view(-1, *FACE) * math.sqrt(ENCODER_DIM), dims[1], dims[2])
        return drive(faces, self.cfg.channels, dims[0], self.cfg.input_gain)

    def forward(self, wc, mask, vectors, dims, checkpoint_every, readout) -> tuple:
        """``(s_{T−1}, s_T, predicted vectors)`` of a presentation of ``vectors``
        ``[n, 256]`` on weights ``wc`` (already in their compute dtype) with
        ``readout = (weight, bias)``; differentiable when gradients are enabled."""
        cfg = self.cfg
        T = cfg.present_steps
        x = self.drive(vectors, dims)
        kw = dict(leak=cfg.leak, activation="tanh", stencil=cfg.stencil, boundary=BOUNDARY)
        s = torch.zeros_like(x)
        if T > 1:
            s = ops.propagate_steps(s, wc, T - 1, mask, x=x, checkpoint_every=checkpoint_every, **kw)
        s_last = ops.propagate(s, wc, mask, x=x, **kw)
        return s, s_last, readout_features(s_last) @ readout[0].T + readout[1]

    def present(self, w, mask, vectors, dims, st, readout=None) -> tuple:
        """:meth:`forward` with the stage's memory choices: bfloat16 weights and
        ``checkpoint_every = ⌈√(T−1)⌉`` with ``memory_optimizations``, else fp32 and no checkpointing."""
        opt = st.memory_optimizations
        wc = w.to(torch.bfloat16) if opt else w
        k = _checkpoint_every(self.cfg.present_steps) if opt else None
        return self.forward(wc, mask, vectors, dims, k, readout or (self.readout_w, self.readout_b))

    @torch.no_grad()
    def predict(self, w, mask, vectors, dims, st) -> torch.Tensor:
        """Predicted answer vectors of ``vectors`` ``[n, 256]``, B at a time."""
        B = self.cfg.batch
        return torch.cat([self.present(w, mask, vectors[i:i + B], dims, st)[2] for i in range(0, len(vectors), B)])

    @torch.no_grad()
    def features(self, w, mask, vectors, dims, st) -> torch.Tensor:
        """The readout's input features ``[n, C·256]`` of ``vectors``, B at a time."""
        B, out = self.cfg.batch, []
        for i in range(0, len(vectors), B):
            out.append(readout_features(self.present(w, mask, vectors[i:i + B], dims, st)[1]))
        return torch.cat(out)

    @staticmethod
    def loss(pred, target) -> torch.Tensor:
        """``mean(1 − cos(pred, target))`` over the batch."""
        return (1 - functional.cosine_similarity(pred, target, dim=1)).mean()

    def gradient_step(self, t, idx, dims, st) -> tuple:
        """One Adam step of the lattice weights and the readout on the pairs ``idx``;
        returns ``(loss, s_{T−1}, s_T)``."""
        w = t.w.detach().requires_grad_(True)
        rw = self.readout_w.detach().requires_grad_(True)
        rb = self.readout_b.detach().requires_grad_(True)
        with torch.enable_grad():
            s_prev, s, pred = self.present(w, t.mask, self.q_train[idx], dims, st, (rw, rb))
            loss = self.loss(pred, self.a_train[idx])
            loss.backward()
        if self.adam_stage != t.stage:
            self.adam, self.adam_t, self.adam_stage = {}, 0, t.stage
        self.adam_t += 1
        for name, p, grad in (("w", t.w, w.grad), ("readout_w", self.readout_w, rw.grad),
                              ("readout_b", self.readout_b, rb.grad)):
            self._adam_(name, p, grad, st.gradient_lr)
        t.w.clamp_(t.cfg.rule.w_min, t.cfg.rule.w_max)
        return float(loss.detach()), s_prev.detach(), s.detach()

    def _adam_(self, name, p, grad, lr) -> None:
        if name not in self.adam:
            self.adam[name] = (torch.zeros_like(p), torch.zeros_like(p))
        m, v = self.adam[name]
        b1, b2 = ADAM_BETAS
        m.mul_(b1).add_(grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (v / (1 - b2 ** self.adam_t)).sqrt_().add_(ADAM_EPS)
        p.addcdiv_(m, denom, value=-lr / (1 - b1 ** self.adam_t))

    # -- one stage -----------------------------------------------------------------------------
    def run_stage(self, t) -> bool:
        """Run the trainer ``t``'s current stage to its end (the module docstring);
        False when stopped by ``stop_after``."""
        from .trainer import progress_bar

        cfg, st = t.cfg, t.cfg.stages[t.stage]
        if not t.started:
            t.start_stage()
        rec = t.records[-1]
        dims = tuple(rec["dims"])
        prof = profile(st.plasticity_profile)
        rule = make_rule(cfg.rule, prof, st.activity_threshold)
        thr = rule.activity_threshold
        kw = dict(stencil=cfg.stencil, boundary=BOUNDARY)
        live = live_synapses(t.mask, geometry("trainer", cfg.stencil, BOUNDARY), dims, t.w.device)
        n_syn = int(t.w.numel() if live is None else live.sum())
        bar = progress_bar(st.steps, t.step, f"stage {t.stage + 1}/{len(cfg.stages)} {st.name} "
                           f"{'x'.join(map(str, dims))}", t.progress)
        t_stage = time.perf_counter()
        while t.step < st.steps:
            if t.stop_after is not None and t.done_steps >= t.stop_after:
                bar.close()
                return False
            t0 = time.perf_counter()
            idx = torch.randint(0, len(self.q_train), (cfg.batch,), generator=t.gen)
            if st.gradient_lr > 0:
                loss, s_prev, s = self.gradient_step(t, idx, dims, st)
            else:
                with torch.no_grad():
                    s_prev, s, pred = self.present(t.w, t.mask, self.q_train[idx], dims, st)
                    loss = float(self.loss(pred, self.a_train[idx]))
            self.loss_sum, self.loss_n = self.loss_sum + loss, self.loss_n + 1
            y = ops.activity(s_prev, s)
            with torch.no_grad():
                if prof.lr_multiplier > 0:
                    lr = prof.lr_multiplier if t.lr_amplification is None else prof.lr_multiplier * t.lr_amplification
                    w_before = t.w.clone() if t.factor is not None else None
                    ops.plasticity_step_(t.w, y, t.pstate, rule, t.mask, lr_scale=lr, activity_threshold=thr, **kw)
                    if w_before is not None:
                        from .clustering import coordinate_

                        coordinate_(t.w, w_before, t.factor, w_min=cfg.rule.w_min, w_max=cfg.rule.w_max, mask=t.mask)
                t.step += 1
                t.done_steps += 1
                if st.clustering_enabled and t.step % cfg.cluster_every == 0:
                    self._recluster(t, y, rec)
            rec["train_seconds"] += time.perf_counter() - t0
            if t.step % cfg.monitor_every == 0 or t.step == st.steps:
                self._monitor(t, st, y, thr, n_syn, rec, dims)
            t.y_prev = y
            bar.update(1)
            if cfg.checkpoint_every and t.done_steps % cfg.checkpoint_every == 0 and t.step < st.steps:
                t.checkpoint()
        bar.close()
        rec["seconds"] += time.perf_counter() - t_stage
        rec["parallel"] = "none"
        propagations = cfg.batch * cfg.present_steps * st.steps   # forward only, as the classification stages
        rec["synapse_updates_per_s"] = n_syn * propagations / max(rec["train_seconds"], 1e-12)
        rec["live_synapses"] = n_syn
        rec["peak_memory_bytes"] = self._held_bytes(t)
        rec["_activity_slice"] = None if t.y_prev is None else t.y_prev.mean(0)[dims[0] // 2].tolist()
        rec["_cluster_slice"] = None if t.clusters is None else t.clusters[dims[0] // 2].tolist()
        rec["decoder_accuracy"] = None
        rec["gradient_lr"] = st.gradient_lr
        if st.gradient_lr > 0:
            rec["activation_memory"] = self.measure_activation_memory(t, dims, st)
        t.stage, t.step, t.started = t.stage + 1, 0, False
        t.checkpoint()
        return True

    def _recluster(self, t, y, rec) -> None:
        from .clustering import cluster_cells, coordination_factor

        labels, _ = cluster_cells(t.w, activity=y.mean(0), k=t.cfg.clusters, seed=t.cfg.seed + t.done_steps,
                                  mask=t.mask)
        t.clusters = labels
        t.factor = coordination_factor(labels, t.cfg.kappa, stencil=t.cfg.stencil, boundary=BOUNDARY)
        rec["cluster_sizes"].append(dict(step=t.step, sizes=torch.bincount(labels.flatten(),
                                                                          minlength=t.cfg.clusters).tolist()))

    @staticmethod
    def _held_bytes(t) -> int:
        ts = [t.w, t.mask, t.factor, t.lr_amplification, t.clusters, t.y_prev, t.pstate.x_pre, t.pstate.x_post,
              t.pstate.theta]
        return int(sum(x.numel() * x.element_size() for x in ts if x is not None))

    def monitor_bleu(self, t, dims, st) -> dict:
        """Corpus BLEU of the decoded monitoring sets and a decoded example."""
        out = {}
        for name, Q, idx, texts_q, texts_a in (
                ("train", self.q_train, self.monitor_train, self.data.train_q, self.data.train_a),
                ("held_out", self.q_test, self.monitor_test, self.data.test_q, self.data.test_a)):
            hyp = self.bank.decode(self.predict(t.w, t.mask, Q[idx], dims, st))
            refs = [texts_a[i] for i in idx.tolist()]
            out[f"bleu_{name}"] = corpus_bleu(hyp, refs)
            out[f"example_{name}"] = dict(question=texts_q[int(idx[0])], decoded=hyp[0], reference=refs[0])
        return out

    def _monitor(self, t, st, y, thr, n_syn, rec, dims) -> None:
        """One monitor point, timed as monitor overhead (SPEC §9)."""
        t0 = time.perf_counter()
        h = dict(step=t.step, activity=float(y.mean()), step_seconds=rec["train_seconds"] / max(t.step, 1),
                 loss=self.loss_sum / max(self.loss_n, 1), memory_bytes=self._held_bytes(t))
        h["synapse_updates_per_s"] = n_syn * t.cfg.batch * t.cfg.present_steps / max(h["step_seconds"], 1e-12)
        self.loss_sum, self.loss_n = 0.0, 0
        if st.decoder_monitoring:
            h.update(self.monitor_bleu(t, dims, st))
        if st.emergence_tracking:
            from .emergence import branching_ratio, emergence_metrics, saliency, weight_field

            field = weight_field(t.w, t.mask)
            h["weights"] = {k: float(v) for k, v in emergence_metrics(field).items()}
            h["activity_field"] = {k: float(v) for k, v in emergence_metrics(y.mean(0).float()).items()}
            if t.y_prev is not None:
                h["branching_ratio"] = float(branching_ratio(t.y_prev > thr, y > thr))
            if t.cfg.amplification > 0:
                t.lr_amplification = (1.0 + t.cfg.amplification * saliency(field)).to(torch.float32).contiguous()
        rec["history"].append(h)
        rec["monitor_seconds"] += time.perf_counter() - t0
        line = f"  step {t.step}: loss {h['loss']:.4f}"
        if st.decoder_monitoring:
            ex = h["example_held_out"]
            line += (f", BLEU train {h['bleu_train']:.1f} held-out {h['bleu_held_out']:.1f} (monitor "
                     f"{100 * rec['monitor_seconds'] / max(rec['train_seconds'], 1e-12):.1f}% of training); "
                     f"{ex['question']!r} -> {ex['decoded']!r}")
        t.log(line)

    def measure_activation_memory(self, t, dims, st) -> dict:
        """Peak bytes of one gradient step's forward + backward (the first B
        training pairs, no update) without and with checkpointing, in the
        stage's weight dtype (:func:`activation_memory`)."""
        T, B = self.cfg.present_steps, self.cfg.batch
        idx = torch.arange(min(B, len(self.q_train)))
        k = _checkpoint_every(T)
        out = dict(checkpoint_every=k, steps=T, batch=int(idx.numel()),
                   weights="bfloat16" if st.memory_optimizations else "float32",
                   method="torch.cuda.max_memory_allocated" if t.w.is_cuda else
                   "torch.profiler [memory] events (CPU allocator total)")
        for key, every in (("without_checkpointing_bytes", None), ("with_checkpointing_bytes", k)):
            def one_step(every=every):
                w = t.w.detach().requires_grad_(True)
                wc = w.to(torch.bfloat16) if st.memory_optimizations else w
                readout = (self.readout_w.detach().requires_grad_(True), self.readout_b.detach().requires_grad_(True))
                pred = self.forward(wc, t.mask, self.q_train[idx], dims, every, readout)[2]
                self.loss(pred, self.a_train[idx]).backward()

            with torch.enable_grad():
                out[key] = activation_memory(one_step, t.w.device)
        return out
