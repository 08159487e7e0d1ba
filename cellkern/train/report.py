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

``quality`` compares held-out accuracies of a ridge decoder fitted on (at
most) ``eval_samples`` training images and scored on (at most) as many test images:

* ``trained`` — the output face of the final lattice;
* ``untrained`` — the same lattice with its initial weights: stage 1's fresh
  weights resampled to the final dims and pruned to the final ``sparse_keep``
  by the same rule (survivors rescaled), so only learning differs;
* ``raw_pixels`` — the images themselves.
"""
from __future__ import annotations

import json
import math
import pathlib
import time

import torch

from .monitor import lattice_features
from .transfer import resample_field

__all__ = ["evaluate_quality", "build_report", "write_report", "summary_table"]


def _ridge_accuracy(xtr, ytr, xte, yte, alpha, n_classes) -> float:
    from .monitor import RidgeDecoder

    return float(RidgeDecoder(alpha=alpha, n_classes=n_classes).fit(xtr, ytr).score(xte, yte))


@torch.no_grad()
def evaluate_quality(trainer) -> dict:
    """Trained vs untrained lattice vs raw pixels (held-out accuracies)."""
    from .data import to_face

    cfg, data = trainer.cfg, trainer.data
    t0 = time.perf_counter()
    n = min(cfg.eval_samples, data.train_x.shape[0])
    m = min(cfg.eval_samples, data.test_x.shape[0])
    D, H, W = trainer.w.shape[1:]
    st = cfg.stages[-1]
    chunk = cfg.batch if st.memory_optimizations else max(n, m)
    kw = dict(channels=cfg.channels, steps=cfg.present_steps, gain=cfg.input_gain, leak=cfg.leak,
              stencil=cfg.stencil, chunk=chunk)
    ftr, fte = to_face(data.train_x[:n], H, W), to_face(data.test_x[:m], H, W)
    ytr, yte = data.train_y[:n], data.test_y[:m]
    out = {}
    w0 = resample_field(trainer.w_initial, (D, H, W)).clamp_(cfg.rule.w_min, cfg.rule.w_max)
    mask0 = None
    if st.sparse_keep < 1:
        from .trainer import prune_stage

        w0, mask0 = prune_stage(w0, None, st.sparse_keep, stencil=cfg.stencil, w_min=cfg.rule.w_min,
                                w_max=cfg.rule.w_max)
    for name, w, mask in (("trained", trainer.w, trainer.mask), ("untrained", w0, mask0)):
        xtr = lattice_features(ftr, w, mask, **kw)
        xte = lattice_features(fte, w, mask, **kw)
        out[name] = _ridge_accuracy(xtr, ytr, xte, yte, cfg.decoder_alpha, data.n_classes)
    out["raw_pixels"] = _ridge_accuracy(data.train_x[:n].flatten(1), ytr, data.test_x[:m].flatten(1), yte,
                                        cfg.decoder_alpha, data.n_classes)
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
        final_dims=list(trainer.w.shape[1:]))


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
    rows.append(f"held-out accuracy: trained lattice {100 * q['trained']:.1f}%, untrained "
                f"{100 * q['untrained']:.1f}%, raw pixels {100 * q['raw_pixels']:.1f}%; "
                f"monitor overhead {100 * report['monitor_overhead']:.1f}% of training time")
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
                ax.imshow(torch.as_tensor(img).numpy(), cmap=cmap)
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

    P = power_spectrum(weight_field(trainer.w, trainer.mask)).to(torch.float64)
    dims = P.shape
    grids = torch.meshgrid(*[torch.fft.fftfreq(n, dtype=torch.float64) for n in dims], indexing="ij")
    radius = torch.sqrt(sum(g ** 2 for g in grids))
    edges = torch.linspace(0, float(radius.max()) + 1e-9, 24)
    which = torch.bucketize(radius.flatten(), edges)
    radial = torch.zeros(len(edges) + 1, dtype=torch.float64).index_add_(0, which, P.flatten())
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
