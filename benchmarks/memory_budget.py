"""Measured peak memory of a training step against :func:`cellkern.memory_estimate`.

    python -m benchmarks.memory_budget                       # 300×300×150, fp32, moore, B=1, C=1
    python -m benchmarks.memory_budget --dims 48,48,36 --batch 2 --channels 4 --no-json

One step is what the staged schedule runs on the cpu backend: ``propagate``
(leak 0.1, tanh, an external drive shaped like ``s``) → ``activity`` →
``plasticity_step_`` (``PlasticityRule()``: STDP + BCM + competition +
normalisation), ``--steps`` times; every tensor is created inside the
measurement. Two measurements:

- ``profiler``: the torch profiler's memory events (``profile_memory=True``),
  which see every torch allocation: peak of "Total Allocated" over the run,
  less what was allocated before it;
- ``rss``: the growth of the process's peak resident set (``VmHWM`` of
  ``/proc/self/status``, reset through ``/proc/self/clear_refs``) over its
  resident set before the run — everything the process touched, Linux only;
  it includes ~40 MB that the first calls cost whatever the lattice (thread
  stacks, code paged in), so it means something only for lattices of GBs.

Each measurement runs in a fresh (spawned) process, so that neither sees the
kernel's per-thread inhibition scratch left over by the other. Prints both
next to the estimate and the ratio estimate/measured, and writes
``benchmarks/results/memory_budget-<machine>-<date>.json`` (unless ``--no-json``).
Exit status 1 when a ratio is outside ``1 ± --tolerance``.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import sys
import tempfile
import time

import torch

import cellkern as ck
from cellkern.memory import MemoryConfig, memory_breakdown, memory_estimate

from . import harness as H


def profiler_peak(fn) -> int:
    """Peak bytes of torch allocations made while ``fn()`` runs (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path, encoding="utf-8") as fh:
            events = [e["args"] for e in json.load(fh)["traceEvents"] if e.get("name") == "[memory]"]
    finally:
        os.unlink(path)
    if not events:
        return 0
    before = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - before


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_peak(fn) -> int:
    """Growth of the peak resident set while ``fn()`` runs (Linux)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")  # resets VmHWM to the current VmRSS
    before = _status_kb("VmRSS")
    fn()
    return _status_kb("VmHWM") - before


def training_step(dims, config: MemoryConfig, steps: int = 2, seed: int = 0):
    """A callable that builds every tensor of ``config`` and runs ``steps``
    steps of the loop :func:`cellkern.memory_estimate` counts (plasticity,
    or ``propagate_steps`` + backward when ``config.autograd``)."""
    c = config

    def run():
        g = torch.Generator().manual_seed(seed)
        shape = (c.batch, c.channels) + tuple(dims)
        s = torch.rand(shape, generator=g, dtype=torch.float32).to(c.state_dtype)
        x = torch.rand(shape, generator=g, dtype=torch.float32).to(c.state_dtype) if c.drive else None
        mask = torch.rand((c.K,) + tuple(dims), generator=g) < c.keep if c.keep < 1 else None
        if c.autograd:
            w = torch.full((c.K,) + tuple(dims), 0.05, dtype=c.weight_dtype, requires_grad=True)
            wc = w if w.dtype == s.dtype else w.to(s.dtype)
            out = ck.ops.propagate_steps(s, wc, c.steps, mask, x=x, leak=0.1, stencil=c.stencil,
                                         checkpoint_every=c.checkpoint_every)
            out.sum().backward()
            return
        w = torch.full((c.K,) + tuple(dims), 0.5, dtype=c.weight_dtype)
        state = ck.PlasticityState.create(tuple(dims), batch=c.batch, dtype=c.state_dtype)
        rule = ck.PlasticityRule(competition=ck.Competition() if c.competition else None)
        for _ in range(steps):
            wc = w if w.dtype == s.dtype else w.to(s.dtype)
            s_next = ck.ops.propagate(s, wc, mask, x=x, leak=0.1, stencil=c.stencil, boundary="periodic")
            del wc
            y = ck.ops.activity(s, s_next)
            ck.ops.plasticity_step_(w, y, state, rule, mask, stencil=c.stencil, boundary="periodic")
            del y
            s = s_next

    return run


def measure_in_child(method: str, dims, config: MemoryConfig, steps: int) -> int:
    """The peak of :func:`training_step` by ``method`` (``profiler`` or ``rss``), in a fresh process."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        return ex.submit(_measure, method, tuple(dims), config, steps).result()


def _measure(method, dims, config, steps):
    fn = training_step(dims, config, steps)
    return profiler_peak(fn) if method == "profiler" else rss_peak(fn)


def _dims(text: str) -> tuple:
    try:
        d = tuple(int(v) for v in text.split(","))
    except ValueError:
        d = ()
    if len(d) != 3 or min(d) < 1:
        raise argparse.ArgumentTypeError(f"--dims must be D,H,W (3 positive ints), got {text!r}")
    return d


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory_budget",
                                description="Measured peak memory of a training step vs cellkern.memory_estimate")
    p.add_argument("--dims", type=_dims, default=(300, 300, 150), metavar="D,H,W", help="Default: 300,300,150")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="weights and state. Default: float32")
    p.add_argument("--steps", type=int, default=2, help="training steps. Default: 2")
    p.add_argument("--method", nargs="+", default=["profiler", "rss"], choices=("profiler", "rss"))
    p.add_argument("--tolerance", type=float, default=0.15, help="allowed |estimate/measured - 1|. Default: 0.15")
    p.add_argument("--no-json", action="store_true", help="do not write benchmarks/results/*.json")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    dt = getattr(torch, args.dtype)
    config = MemoryConfig(weight_dtype=dt, state_dtype=dt, batch=args.batch, channels=args.channels)
    dims = args.dims
    info = H.describe_machine(torch.device("cpu"))
    est = memory_estimate(dims, config)
    print(f"memory budget: dims {dims} ({dims[0] * dims[1] * dims[2] / 1e6:.1f} M cells), {args.dtype}, "
          f"moore, B={args.batch}, C={args.channels}, {args.steps} steps of propagate → activity → "
          f"plasticity_step_ on the {ck.backends.select(None, torch.device('cpu'), 'memory_budget')[0]} backend")
    print(f"estimate: {est / 2**30:.3f} GiB ({est} bytes)")
    for name, b in memory_breakdown(dims, config).items():
        print(f"  {name:22s} {b / 2**20:10.1f} MiB")
    rows, ok = [], True
    for method in args.method:
        t0 = time.perf_counter()
        peak = measure_in_child(method, dims, config, args.steps)
        ratio = est / peak if peak else float("nan")
        good = abs(ratio - 1) <= args.tolerance
        ok &= good
        rows.append({"method": method, "measured_bytes": peak, "ratio": ratio, "ok": good,
                     "seconds": time.perf_counter() - t0})
        print(f"{method:9s} measured {peak / 2**30:.3f} GiB   estimate/measured {ratio:.3f}   "
              f"{'ok' if good else 'OUTSIDE ±' + str(args.tolerance)}   ({rows[-1]['seconds']:.0f} s)")
    if not args.no_json:
        payload = {"suite": "memory_budget", "machine": info, "dims": list(dims), "dtype": args.dtype,
                   "batch": args.batch, "channels": args.channels, "steps": args.steps,
                   "estimate_bytes": est, "breakdown": memory_breakdown(dims, config), "rows": rows}
        print(f"wrote {H.write_json('memory_budget', payload, info)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
