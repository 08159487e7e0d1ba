"""The run's report: the quality comparison, ``report.json`` and PNG plots.

``report.json`` holds ``stages`` (each with ``name``, ``dims``, ``steps``,
``seconds``, ``synapse_updates_per_s``, ``peak_memory_bytes``,
``estimated_memory_bytes``, ``decoder_accuracy`` — the monitor's held-out
accuracy over every sample it scored in the stage's second half — and its ``history`` of
monitor points — decoder accuracy, activity, emergence metrics, branching
ratio, step time — plus ``cluster_sizes``), ``quality`` and
``monitor_overhead`` (monitor seconds / training seconds). A stage's
``synapse_updates_per_s`` is live synapses × B × steps / training seconds
(every step propagates through every live synapse for each of the B samples
and, unless the stage is frozen, updates it).

Each stage also carries ``max_abs_feature`` (the largest |feature| the
monitor read) and ``reach_step`` (the latest, over the stage's presentations,
of the first step at which the read region's mean |s| exceeds 1e-3): a stage
whose readout stays below 1e-3 stops the run with an error (SPEC §12).

``quality`` is the fair comparison of SPEC §12 on this run's seed: held-out
accuracies (``accuracy``, with the ridge ``alpha`` chosen by 5-fold
cross-validation on the (at most) ``eval_samples`` training images, and
``max_abs_feature``) of

* ``trained`` — the features of the final lattice (``features`` of the config);
* ``untrained`` — its twin: stage 1's fresh weights resampled to the final
  dims, with the same connectivity and pruning, so only learning differs;
* ``raw_pixels`` — the images themselves;
* ``random_features`` — relu of a fixed random projection of the pixels, as
  many features as the lattice gives;

and ``trained_minus_twin``. ``python -m benchmarks.quality`` repeats it over
seeds with intervals.
"""
from __future__ import annotations

import json
import math
import pathlib
import time

import torch

from .monitor import lattice_features
from .transfer import resample_field

__all__ = ["evaluate_quality", "fair_readout", "cv_alpha", "random_features", "twin_weights", "build_report",
           "write_report", "summary_table"]


#: the ridge penalties the readout's cross-validation chooses from (SPEC §12)
ALPHAS = (1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3, 1e4)


def _ridge(alpha, n_classes):
    from .monitor import RidgeDecoder

    return RidgeDecoder(alpha=alpha, n_classes=n_classes)


def cv_alpha(x, y, n_classes, folds: int = 5, seed: int = 0) -> float:
    """The ridge α of :data:`ALPHAS` with the best mean accuracy over ``folds``
    folds of the training split (the test split is never seen); ties: the larger α."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    order = torch.randperm(x.shape[0], generator=g, device="cpu").to(x.device)
    parts = order.chunk(folds)
    best, best_acc = ALPHAS[0], -1.0
    for alpha in ALPHAS:
        accs = []
        for i in range(folds):
            val = parts[i]
            fit = torch.cat([parts[j] for j in range(folds) if j != i])
            accs.append(_ridge(alpha, n_classes).fit(x[fit], y[fit]).score(x[val], y[val]))
        acc = sum(accs) / len(accs)
        if acc >= best_acc:
            best, best_acc = alpha, acc
    return best


def fair_readout(xtr, ytr, xte, yte, n_classes, seed: int = 0) -> dict:
    """Held-out accuracy of the SPEC §12 readout (ridge, α by cross-validation on the training split)."""
    alpha = cv_alpha(xtr, ytr, n_classes, seed=seed)
    acc = float(_ridge(alpha, n_classes).fit(xtr, ytr).score(xte, yte))
    return dict(accuracy=acc, alpha=alpha, max_abs_feature=float(xtr.abs().max()), features=int(xtr.shape[1]))


def random_features(x: torch.Tensor, n_features: int, seed: int) -> torch.Tensor:
    """``relu(P·x)`` with a fixed seeded Gaussian ``P`` of ``n_features`` rows: random features of a given size."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    P = torch.randn(n_features, x.shape[1], generator=g, device="cpu").to(x.device) / x.shape[1] ** 0.5
    return torch.relu(x @ P.T)


def twin_weights(trainer):
    """The untrained twin (SPEC §12): the run's initial weights carried through the
    same transfer to the last stage's dims, its connectivity and pruning."""
    cfg = trainer.cfg
    dims = tuple(trainer.w.shape[-3:])
    st = cfg.stages[-1]
    w0 = resample_field(trainer.w_initial, dims)
    if cfg.model != "mixing":
        w0 = w0.clamp_(cfg.rule.w_min, cfg.rule.w_max)
    mask0 = trainer._connectivity(dims)
    if st.sparse_keep < 1:
        from .trainer import prune_stage

        w0, mask0 = prune_stage(w0, mask0, st.sparse_keep, stencil=cfg.stencil, w_min=cfg.rule.w_min,
                                w_max=cfg.rule.w_max)
    return w0, mask0


@torch.no_grad()
def evaluate_quality(trainer) -> dict:
    """The fair comparison of SPEC §12 on this run: the trained lattice, its
    untrained twin, raw pixels and random features of the lattice's size, each
    read by the same ridge readout with α chosen by cross-validation on the
    training split (``eval_samples`` labelled training images), scored on held-out
    test images. A lattice whose features do not reach 1e-3 is an error."""
    from .data import to_face
    from .monitor import check_reach

    cfg, data = trainer.cfg, trainer.data
    t0 = time.perf_counter()
    n = min(cfg.eval_samples, data.train_x.shape[0])
    m = min(cfg.eval_samples, data.test_x.shape[0])
    D, H, W = trainer.w.shape[-3:]
    st = cfg.stages[-1]
    chunk = cfg.batch if st.memory_optimizations else max(n, m)
    kw = dict(channels=cfg.channels, steps=cfg.present_steps, gain=cfg.input_gain, leak=cfg.leak,
              stencil=cfg.stencil, chunk=chunk, activation=cfg.activation, features=cfg.features,
              drive_mode="channel0" if cfg.model == "mixing" else "gain")
    dev = trainer.w.device
    ftr, fte = to_face(data.train_x[:n].to(dev), H, W), to_face(data.test_x[:m].to(dev), H, W)
    ytr, yte = data.train_y[:n].to(dev), data.test_y[:m].to(dev)
    out = {}
    w0, mask0 = twin_weights(trainer)
    for name, w, mask in (("trained", trainer.w, trainer.mask), ("untrained", w0, mask0)):
        xtr, reach = lattice_features(ftr, w, mask, **kw)
        xte, _ = lattice_features(fte, w, mask, **kw)
        check_reach(f"evaluation ({name} lattice)", float(xtr.abs().max()), reach, cfg.present_steps)
        out[name] = fair_readout(xtr, ytr, xte, yte, data.n_classes, seed=cfg.seed)
        out[name]["reach_step"] = reach
    rtr, rte = data.train_x[:n].flatten(1).to(dev), data.test_x[:m].flatten(1).to(dev)
    out["raw_pixels"] = fair_readout(rtr, ytr, rte, yte, data.n_classes, seed=cfg.seed)
    F = out["trained"]["features"]
    out["random_features"] = fair_readout(random_features(rtr, F, cfg.seed), ytr, random_features(rte, F, cfg.seed),
                                          yte, data.n_classes, seed=cfg.seed)
    out["trained_minus_twin"] = out["trained"]["accuracy"] - out["untrained"]["accuracy"]
    out.update(train_samples=n, test_samples=int(yte.shape[0]), seconds=time.perf_counter() - t0)
    return out


def build_report(trainer) -> dict:
    """The report dict of a finished run (runs :func:`evaluate_quality`)."""
    from .. import __version__

    stages = [{k: v for k, v in r.items() if not k.startswith("_")} for r in trainer.records]
    train = sum(r["train_seconds"] for r in trainer.records)
    monitor = sum(r["monitor_seconds"] for r in trainer.records)
    if trainer.qa is not None:
        from .qa_report import evaluate_qa

        quality = evaluate_qa(trainer)
    else:
        quality = evaluate_quality(trainer)
    return dict(
        version=__version__, task=trainer.cfg.task, config=trainer.cfg.to_dict(), data=trainer.data.name,
        stages=stages, quality=quality,
        monitor_overhead=monitor / max(train, 1e-12), train_seconds=train, monitor_seconds=monitor,
        final_dims=list(trainer.w.shape[-3:]), device=device_name(trainer.w.device))


def device_name(device: torch.device) -> str:
    """``"cpu"``, or ``"cuda:0 (NVIDIA H200)"``: where the run's tensors lived."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def summary_table(report: dict) -> str:
    """The per-stage summary as a Markdown table."""
    rows = ["| stage | dims | steps | seconds | synapse-updates/s | decoder acc. | est. memory | peak memory |",
            "|---|---|---|---|---|---|---|---|"]
    for s in report["stages"]:
        acc = "–" if s.get("decoder_accuracy") is None else f"{100 * s['decoder_accuracy']:.1f}%"
        rows.append(f"| {s['name']} | {'×'.join(map(str, s['dims']))} | {s['steps']} | {s['seconds']:.1f} | "
                    f"{s['synapse_updates_per_s'] / 1e6:.1f} M | {acc} | {s['estimated_memory_bytes'] / 2**20:.1f} MiB"
                    f" | {s['peak_memory_bytes'] / 2**20:.1f} MiB |")
    if report.get("task") == "qa":
        from .qa_report import qa_summary

        return "\n".join(rows + qa_summary(report))
    q = report["quality"]
    rows.append("")
    acc = {k: 100 * q[k]["accuracy"] for k in ("trained", "untrained", "raw_pixels", "random_features")}
    rows.append(f"held-out accuracy (ridge, alpha by CV): trained lattice {acc['trained']:.1f}%, untrained twin "
                f"{acc['untrained']:.1f}%, raw pixels {acc['raw_pixels']:.1f}%, random features "
                f"{acc['random_features']:.1f}%; monitor overhead {100 * report['monitor_overhead']:.1f}% of "
                "training time")
    if report.get("device"):
        rows.append(f"device: {report['device']}")
    return "\n".join(rows)


def _plots(report: dict, trainer, out: pathlib.Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    offset = 0
    for s in report["stages"]:
        hs = s["history"]
        xs = [offset + h["step"] for h in hs]
        for key, style in ((("bleu_train", "o-"), ("bleu_held_out", "s--")) if report.get("task") == "qa"
                           else (("decoder_accuracy", "o-"),)):
            acc = [(offset + h["step"], h[key]) for h in hs if h.get(key) is not None]
            if acc:
                a1.plot(*zip(*acc), style, ms=3, label=f"{s['name']} {key}" if report.get("task") == "qa" else s["name"])
        a2.plot(xs, [h["activity"] for h in hs], "-", label=s["name"])
        offset += s["steps"]
        for a in (a1, a2):
            a.axvline(offset, color="grey", lw=0.5, ls="--")
    a1.set_ylabel("monitor BLEU" if report.get("task") == "qa" else "decoder accuracy (held out)")
    a2.set_ylabel("mean activity")
    a2.set_xlabel("step")
    if a1.get_lines():
        a1.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "training.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    recs = trainer.records
    fig, axes = plt.subplots(2, len(recs), figsize=(2.6 * len(recs), 5.2), squeeze=False)
    for j, r in enumerate(recs):
        for i, (key, title, cmap) in enumerate((("_activity_slice", "activity", "viridis"),
                                                ("_cluster_slice", "clusters", "tab10"))):
            ax = axes[i, j]
            img = r.get(key)
            if img is not None:
                ax.imshow(torch.as_tensor(img, device="cpu").numpy(), cmap=cmap)
            else:
                ax.text(0.5, 0.5, "off", ha="center", va="center")
            ax.set_title(f"{r['name']}\n{title}, z = {r['dims'][0] // 2}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    paths.append(out / "slices.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    from .emergence import power_spectrum, weight_field

    w = trainer.w.norm(dim=(1, 2)) if trainer.w.dim() == 6 else trainer.w  # the mixing form: each synapse's norm
    P = power_spectrum(weight_field(w, trainer.mask)).to("cpu", torch.float64)  # plotted on the CPU
    dims = P.shape
    grids = torch.meshgrid(*[torch.fft.fftfreq(n, dtype=torch.float64, device="cpu") for n in dims], indexing="ij")
    radius = torch.sqrt(sum(g ** 2 for g in grids))
    edges = torch.linspace(0, float(radius.max()) + 1e-9, 24, device="cpu")
    which = torch.bucketize(radius.flatten(), edges)
    radial = torch.zeros(len(edges) + 1, dtype=torch.float64, device="cpu").index_add_(0, which, P.flatten())
    counts = torch.bincount(which, minlength=len(edges) + 1).clamp(min=1)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.semilogy(edges[1:].numpy(), (radial / counts)[1:len(edges)].numpy().clip(min=1e-30), "o-", ms=3)
    ax.set_xlabel("spatial frequency (cycles per cell)")
    ax.set_ylabel("power of Σ|w|")
    ax.set_title(f"weight power spectrum, {'×'.join(map(str, dims))}")
    fig.tight_layout()
    paths.append(out / "weight_spectrum.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def write_report(report: dict, trainer, out, log=print) -> pathlib.Path:
    """Write ``report.json`` and the plots into ``out``; logs where they are."""
    out = pathlib.Path(out)
    report["plots"] = [str(p) for p in _plots(report, trainer, out)]
    path = out / "report.json"
    path.write_text(json.dumps(_jsonable(report), indent=1))
    log(f"report: {path}")
    for p in report["plots"]:
        log(f"plot:   {p}")
    return path
