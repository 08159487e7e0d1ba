"""Soak benchmark: the main job in a loop for a long time, its memory sampled.

    python -m benchmarks.soak --minutes 125 --threads 1
    python -m benchmarks.soak --minutes 1 --out /tmp/soak.json          # smoke test
    python -m benchmarks.soak --minutes 30 --config my.toml --no-files

Workload (CPU): :class:`cellkern.train.trainer.Trainer` runs a schedule — by
default :func:`soak_config`, the default schedule of SPEC §8 scaled down
(five stages 8³ → 15×20×20 covering discovery, learning, clustering,
pruning to 30% and freeze, checkpoints every 40 steps) — from the start, again
and again, each run a new ``Trainer`` writing its run folder (config,
checkpoints, report and plots) into a temporary folder that is deleted after
the run (``--no-files``: ``out=None``, nothing on disk). Progress bars and log
lines are off.

Workload (``--device cuda``, or ``--workload ops``): the trainer keeps its
tensors on the CPU, so on a GPU the soak loops the trainer's inner step instead — ``propagate``,
``activity``, ``plasticity_step_`` — on each stage's dims, fresh weights and
state per loop, with the same schedule's batch, present steps and profiles.

Samples, every ``--interval`` seconds (a background thread signals the main
thread, which takes the sample between two bytecodes), and once after every run (the run's objects freed and ``gc.collect()`` called; the
clean series for leaks):

- ``rss_bytes``: the resident set (``/proc/self/statm``);
- ``tensors`` / ``tensor_bytes``: the live ``torch.Tensor`` objects the
  garbage collector knows of, and the bytes of their storages (each storage
  counted once);
- ``fds``: open file descriptors (``/proc/self/fd``);
- ``cuda_allocated_bytes`` / ``cuda_reserved_bytes`` where a GPU is used;
- per run: the mean training step time (the trainer's own ``train_seconds``
  over its steps, monitor excluded) and the run's wall time.

The JSON (and a PNG plot of every series against time) is rewritten every
``--save-every`` seconds, so a run cut short still leaves its data. At the
end (or on SIGTERM/SIGINT) it prints and writes, per series, the least-squares
slope per hour after the warm-up (``--warmup-minutes``, default 10% of the
run, at least one run), its residual standard deviation and a 95% interval of
the slope (Student t on the residuals; samples are autocorrelated, so the
interval is if anything too narrow), the values at the start and end of the
analysed window, and the step time's median and spread.

Results: ``benchmarks/results/soak-<device-slug>-<date>.json`` / ``.png``
(with the machine, as :mod:`benchmarks.harness` describes it, and the git commit).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import torch

from . import harness as H

SUITE = "soak"
SERIES = ("rss_bytes", "tensors", "tensor_bytes", "fds", "cuda_allocated_bytes", "cuda_reserved_bytes")


def soak_config():
    """The default schedule scaled down: every stage kind (discovery, learning,
    clustering, pruning to 30%, freeze) with transfers, emergence tracking,
    decoder monitoring and checkpoints; one run takes tens of seconds on one core."""
    from cellkern.train.config import ScheduleConfig, StageConfig

    S = StageConfig
    stages = [
        S("discovery", (8, 8, 8), 120, "discovery", 0.01),
        S("learning", (10, 10, 10), 120, "learning", 0.02),
        S("learning-clustered", (12, 12, 12), 120, "learning", 0.03, clustering_enabled=True),
        S("consolidation", (12, 16, 16), 80, "consolidation", 0.05, clustering_enabled=True, sparse_keep=0.3),
        S("freeze", (15, 20, 20), 40, "freeze", 0.1, clustering_enabled=True, sparse_keep=0.3),
    ]
    return ScheduleConfig(stages=stages, batch=8, present_steps=30, monitor_every=40, cluster_every=40,
                          checkpoint_every=40, decoder_buffer=256, eval_samples=150)


# -- measurements ------------------------------------------------------------------------------
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes():
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # a peak, where /proc is missing


def open_fds():
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # minus the listing's own descriptor
    except OSError:
        return None


def live_tensors():
    """``(count, bytes)`` of the live tensors the garbage collector tracks; a
    storage shared by several tensors (views) counts once."""
    n, seen, total = 0, set(), 0
    for obj in gc.get_objects():
        if not issubclass(type(obj), torch.Tensor):  # type(), not isinstance: no __class__ lookups on proxies
            continue
        n += 1
        try:
            st = obj.untyped_storage()
            key = (st.data_ptr(), st.device.type, st.device.index)
            if key not in seen:
                seen.add(key)
                total += st.nbytes()
        except (RuntimeError, NotImplementedError):  # sparse / meta / wrapper tensors have no plain storage
            pass
    return n, total


def sample(device: torch.device, tensors: bool = True, **extra) -> dict:
    """One sample; ``tensors`` only from the main thread (see :func:`main`)."""
    n, nbytes = live_tensors() if tensors else (None, None)
    s = dict(t=time.time(), rss_bytes=rss_bytes(), tensors=n, tensor_bytes=nbytes, fds=open_fds(), **extra)
    if device.type == "cuda":
        s["cuda_allocated_bytes"] = torch.cuda.memory_allocated(device)
        s["cuda_reserved_bytes"] = torch.cuda.memory_reserved(device)
    return s


# -- statistics --------------------------------------------------------------------------------
def _t95(dof: int) -> float:
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, dof))
    except ImportError:
        return 1.96 + 2.4 / max(dof, 1)  # close to Student's t for dof >= 3


def fit_slope(ts, ys) -> dict | None:
    """Least squares ``y = a + b·t`` (t in hours): slope b per hour, the residual
    std, a 95% interval of b, and the first/last values and the mean."""
    pts = [(t, y) for t, y in zip(ts, ys) if y is not None]
    if len(pts) < 3:
        return None
    n = len(pts)
    mt = sum(t for t, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((t - mt) ** 2 for t, _ in pts)
    if sxx <= 0:
        return None
    b = sum((t - mt) * (y - my) for t, y in pts) / sxx
    a = my - b * mt
    rss = sum((y - a - b * t) ** 2 for t, y in pts)
    resid_std = math.sqrt(rss / (n - 2))
    se = resid_std / math.sqrt(sxx)
    half = _t95(n - 2) * se
    return dict(n=n, hours=pts[-1][0] - pts[0][0], slope_per_hour=b, slope_ci95=[b - half, b + half],
                residual_std=resid_std, mean=my, first=pts[0][1], last=pts[-1][1],
                min=min(y for _, y in pts), max=max(y for _, y in pts),
                slope_per_hour_relative=(b / my if my else None))


def _quantile(xs, q):
    xs = sorted(xs)
    if not xs:
        return None
    i = q * (len(xs) - 1)
    lo, hi = math.floor(i), math.ceil(i)
    return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)


def analyse(state: dict) -> dict:
    """Slopes of every series after the warm-up, for the background samples and
    the after-run samples, and the step-time statistics."""
    t0 = state["t_start"]
    warm = t0 + state["settings"]["warmup_minutes"] * 60
    runs = state["runs"]
    if runs:  # at least the first run is warm-up
        warm = max(warm, runs[0]["t_end"] + 1e-6)
    out = {"warmup_ends_s": warm - t0}
    for name, samples in (("background", state["samples"]), ("after_run", state["after_run"])):
        pts = [s for s in samples if s["t"] >= warm]
        res = {}
        for key in SERIES:
            if any(s.get(key) is not None for s in pts):
                res[key] = fit_slope([(s["t"] - t0) / 3600 for s in pts], [s.get(key) for s in pts])
        out[name] = res
    late = [r for r in runs if r["t_end"] >= warm]
    steps = [r["step_ms"] for r in late]
    if steps:
        med = _quantile(steps, 0.5)
        out["step_ms"] = dict(runs=len(steps), median=med, q10=_quantile(steps, 0.1), q90=_quantile(steps, 0.9),
                              min=min(steps), max=max(steps),
                              iqr=_quantile(steps, 0.75) - _quantile(steps, 0.25),
                              trend=fit_slope([(r["t_end"] - t0) / 3600 for r in late], steps))
    return out


# -- output ------------------------------------------------------------------------------------
def _git_commit() -> dict:
    root = pathlib.Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return {"commit": head or None, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def write_json(path: pathlib.Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=1, default=str)
        fh.write("\n")
    os.replace(tmp, path)


def plot(path: pathlib.Path, state: dict, analysis: dict) -> pathlib.Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    t0 = state["t_start"]
    keys = [k for k in SERIES if any(s.get(k) is not None for s in state["samples"])]
    panels = keys + ["step_ms"]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.1 * len(panels)), sharex=True)
    warm_min = analysis.get("warmup_ends_s", 0) / 60
    for ax, key in zip(axes, panels):
        if key == "step_ms":
            xs = [(r["t_end"] - t0) / 60 for r in state["runs"]]
            ax.plot(xs, [r["step_ms"] for r in state["runs"]], ".", ms=3, label="mean step of a run")
            ax.set_ylabel("step ms", fontsize=8)
        else:
            scale = 2**20 if key.endswith("bytes") else 1
            bg = [s for s in state["samples"] if s.get(key) is not None]
            ar = [s for s in state["after_run"] if s.get(key) is not None]
            ax.plot([(s["t"] - t0) / 60 for s in bg], [s[key] / scale for s in bg], "-", lw=0.6, alpha=0.6,
                    label="every few s")
            ax.plot([(s["t"] - t0) / 60 for s in ar], [s[key] / scale for s in ar], ".", ms=3, label="after a run")
            fit = analysis.get("after_run", {}).get(key)
            if fit:
                ax.set_title(f"{key}: after-run slope {fit['slope_per_hour'] / scale:+.4g}"
                             f"{' MiB' if scale > 1 else ''}/h (95% [{fit['slope_ci95'][0] / scale:+.3g}, "
                             f"{fit['slope_ci95'][1] / scale:+.3g}], resid std {fit['residual_std'] / scale:.3g})",
                             fontsize=8)
            ax.set_ylabel(key.replace("_bytes", " MiB") if scale > 1 else key, fontsize=8)
        ax.axvline(warm_min, color="grey", ls=":", lw=0.8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="lower right")
    axes[-1].set_xlabel("minutes")
    fig.suptitle(f"soak: {state['settings']['workload']} on {state['machine']['device']} "
                 f"({state['settings']['threads']} thread(s))", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- workloads ---------------------------------------------------------------------------------
def trainer_run(cfg, files: bool) -> dict:
    """One whole run of the schedule by a new Trainer; returns its step time."""
    from cellkern.train.trainer import Trainer

    tmp = tempfile.mkdtemp(prefix="cellkern-soak-") if files else None
    try:
        t = Trainer(copy.deepcopy(cfg), tmp, log=lambda msg: None, progress=False)
        t0 = time.perf_counter()
        t.run()
        wall = time.perf_counter() - t0
        steps = sum(r["steps"] for r in t.records)
        train = sum(r["train_seconds"] for r in t.records)
        stage_ms = [1e3 * r["train_seconds"] / r["steps"] for r in t.records]
        del t
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return dict(steps=steps, step_ms=1e3 * train / steps, stage_step_ms=stage_ms, wall_s=wall)


def ops_run(cfg, device: torch.device) -> dict:
    """The trainer's inner step on ``device`` (fresh weights and state per
    stage), for devices the trainer does not place tensors on."""
    from cellkern import ops as ck
    from cellkern.train.monitor import BOUNDARY, drive
    from cellkern.rules import PlasticityState
    from cellkern.train.config import make_rule, profile
    from cellkern.stencil import stencil as make_stencil

    g = torch.Generator(device=device).manual_seed(cfg.seed)
    K = make_stencil(cfg.stencil).K
    steps, train, stage_ms, t_run = 0, 0.0, [], time.perf_counter()
    kw = dict(stencil=cfg.stencil, boundary=BOUNDARY)
    for st in cfg.stages:
        dims = tuple(st.dims)
        prof = profile(st.plasticity_profile)
        rule = make_rule(cfg.rule, prof, st.activity_threshold)
        w = cfg.rule.w_min + cfg.rule.w_init * torch.rand((K, *dims), generator=g, device=device)
        pstate = PlasticityState.create(dims, cfg.batch, theta0=cfg.rule.theta0, device=device)
        s = x = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            for step in range(st.steps):
                if step % cfg.present_steps == 0:
                    faces = torch.rand((cfg.batch, dims[1], dims[2]), generator=g, device=device)
                    x = drive(faces, cfg.channels, dims[0], cfg.input_gain)
                    s = torch.zeros_like(x)
                s_new = ck.propagate(s, w, None, x=x, leak=cfg.leak, activation="tanh", **kw)
                y = ck.activity(s, s_new)
                if prof.lr_multiplier > 0:
                    ck.plasticity_step_(w, y, pstate, rule, lr_scale=prof.lr_multiplier,
                                        activity_threshold=rule.activity_threshold, **kw)
                s = s_new
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        steps, train = steps + st.steps, train + dt
        stage_ms.append(1e3 * dt / st.steps)
        del w, pstate, s, x
    return dict(steps=steps, step_ms=1e3 * train / steps, stage_step_ms=stage_ms,
                wall_s=time.perf_counter() - t_run)


# -- main --------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, required=True, help="how long to run")
    p.add_argument("--config", help="a schedule file (.toml/.yaml); default: the scaled-down default schedule")
    p.add_argument("--device", default="cpu", help="cpu (the trainer) or cuda[:i] (the trainer's step loop)")
    p.add_argument("--out", help="the JSON path (the PNG goes beside it); default: benchmarks/results/soak-…")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between background samples")
    p.add_argument("--save-every", type=float, default=60.0, help="seconds between rewrites of the JSON/PNG")
    p.add_argument("--warmup-minutes", type=float, default=None, help="default: 10%% of --minutes")
    p.add_argument("--no-files", action="store_true", help="trainer runs keep nothing on disk (out=None)")
    p.add_argument("--workload", choices=("trainer", "ops"), default=None,
                   help="trainer: whole Trainer runs (CPU only); ops: the trainer's step loop on --device "
                        "(default: trainer on cpu, ops on cuda)")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.interval <= 0 or args.save_every <= 0:
        p.error("--minutes, --interval and --save-every must be > 0")
    if args.threads is not None:
        if args.threads < 1:
            p.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda[:i], got {args.device!r}")

    import cellkern
    from cellkern.backends import backend_status
    from cellkern.train.config import load_config

    cfg = load_config(args.config) if args.config else soak_config()
    cfg.validate()
    workload = args.workload or ("trainer" if device.type == "cpu" else "ops")
    if workload == "trainer" and device.type != "cpu":
        p.error("--workload trainer runs on the CPU only (the trainer places its tensors there); use --workload ops")
    info = H.describe_machine(device)
    out = pathlib.Path(args.out) if args.out else H.results_path(SUITE, info)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    warmup = args.warmup_minutes if args.warmup_minutes is not None else 0.1 * args.minutes

    state = dict(
        suite=SUITE, machine=info, git=_git_commit(), cellkern_file=cellkern.__file__,
        backends=backend_status(),
        settings=dict(minutes=args.minutes, workload=workload, device=str(device), threads=torch.get_num_threads(),
                      omp_num_threads=os.environ.get("OMP_NUM_THREADS"), interval_s=args.interval,
                      save_every_s=args.save_every, warmup_minutes=warmup, files=not args.no_files,
                      config=args.config or "benchmarks.soak.soak_config()", schedule=cfg.to_dict()),
        t_start=time.time(), samples=[], after_run=[], runs=[], status="running")
    lock = threading.RLock()          # RLock: the main thread's SIGUSR1 handler may take it inside the main loop
    stop = threading.Event()
    loop_no = [0]

    def save(final=False):
        with lock:
            snap = {k: (list(v) if isinstance(v, list) else v) for k, v in state.items()}
        snap["analysis"] = analysis = analyse(snap)
        snap["elapsed_minutes"] = (time.time() - snap["t_start"]) / 60
        write_json(out, snap)
        try:
            plot(png, snap, analysis)
        except Exception as exc:  # noqa: BLE001 - a failed plot must not lose the data
            print(f"soak: plot failed: {exc!r}", file=sys.stderr)
        return snap

    # gc.get_objects() in a second thread can hand out objects the main thread
    # is still building (a tuple being resized: "SystemError: bad argument to
    # internal function"), so the tensors are counted in the main thread: the
    # sampler thread sends it SIGUSR1, whose handler runs between bytecodes and
    # drops its references before the interrupted code resumes.
    main_ident = threading.main_thread().ident
    in_main = hasattr(signal, "pthread_kill") and hasattr(signal, "SIGUSR1")

    def on_usr1(signum, frame):
        s = sample(device, run=loop_no[0])
        with lock:
            state["samples"].append(s)

    if in_main:
        signal.signal(signal.SIGUSR1, on_usr1)

    def sampler():
        last_save = time.time()
        while not stop.wait(args.interval):
            if in_main:
                signal.pthread_kill(main_ident, signal.SIGUSR1)
            else:
                s = sample(device, tensors=False, run=loop_no[0])
                with lock:
                    state["samples"].append(s)
            if time.time() - last_save >= args.save_every:
                save()
                last_save = time.time()

    def on_signal(signum, frame):
        stop.set()
        state["status"] = f"stopped by signal {signum}"

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)

    print(f"soak: {workload} on {device} for {args.minutes} min, {torch.get_num_threads()} thread(s); "
          f"writing {out} every {args.save_every:.0f} s", flush=True)
    gc.collect()
    state["after_run"].append(sample(device, run=0))
    th = threading.Thread(target=sampler, name="soak-sampler", daemon=True)
    th.start()
    deadline = state["t_start"] + args.minutes * 60
    from cellkern.train.trainer import RunInterrupted

    try:
        while time.time() < deadline and not stop.is_set():
            loop_no[0] += 1
            try:
                r = trainer_run(cfg, not args.no_files) if workload == "trainer" else ops_run(cfg, device)
            except RunInterrupted as exc:        # the trainer caught SIGTERM/SIGINT during its run
                state["status"] = f"stopped by signal {exc.signum}"
                break
            r["run"], r["t_end"] = loop_no[0], time.time()
            gc.collect()
            s = sample(device, run=loop_no[0])
            with lock:
                state["runs"].append(r)
                state["after_run"].append(s)
            print(f"run {loop_no[0]:4d}  {(r['t_end'] - state['t_start']) / 60:7.1f} min  "
                  f"step {r['step_ms']:7.2f} ms  rss {s['rss_bytes'] / 2**20:8.1f} MiB  "
                  f"tensors {s['tensors']:6d} ({s['tensor_bytes'] / 2**20:.2f} MiB)  fds {s['fds']}", flush=True)
    finally:
        stop.set()
        th.join(timeout=60)
        if in_main:
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        if state["status"] == "running":
            state["status"] = "completed" if time.time() >= deadline else "stopped"
        snap = save(final=True)
    report(snap, out, png)
    return 0


def report(snap: dict, out, png) -> None:
    a = snap["analysis"]
    t_min = snap["elapsed_minutes"]
    print(f"\nsoak {snap['status']}: {len(snap['runs'])} runs in {t_min:.1f} min; warm-up until "
          f"{a['warmup_ends_s'] / 60:.1f} min; slopes by least squares over the samples after it")
    rows = []
    for name in ("after_run", "background"):
        for key, f in a.get(name, {}).items():
            if not f:
                continue
            scale, unit = (2**20, " MiB") if key.endswith("bytes") else (1, "")
            rows.append([name, key, str(f["n"]), f"{f['first'] / scale:.4g}{unit}", f"{f['last'] / scale:.4g}{unit}",
                         f"{f['slope_per_hour'] / scale:+.4g}{unit}/h",
                         f"[{f['slope_ci95'][0] / scale:+.3g}, {f['slope_ci95'][1] / scale:+.3g}]",
                         f"{f['residual_std'] / scale:.3g}{unit}"])
    if not rows:
        print("too few samples after the warm-up for a slope (3 needed); run longer or shorten --warmup-minutes")
    else:
        print(H.format_table([("samples", "<"), ("series", "<"), ("n", ">"), ("first", ">"), ("last", ">"),
                              ("slope", ">"), ("95% interval", ">"), ("resid std", ">")], rows))
    st = a.get("step_ms")
    if st:
        print(f"step time (mean step of each run after warm-up, {st['runs']} runs): median {st['median']:.3f} ms, "
              f"10-90% [{st['q10']:.3f}, {st['q90']:.3f}] ms, IQR {st['iqr']:.3f} ms")
    print(f"wrote {out}")
    if pathlib.Path(png).exists():
        print(f"wrote {png}")


if __name__ == "__main__":
    sys.exit(main())
