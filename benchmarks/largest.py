"""The seeds' largest lattice: one plasticity-only stage at 666×666×333 and at the largest lattice the device holds.

    python -m benchmarks.largest --device cuda              # 666x666x333 and the largest 2:2:1 lattice
    python -m benchmarks.largest --smoke                    # a 24x24x12 lattice, a few steps, any device
    python -m benchmarks.largest --dims 300,300,150 --backend cuda --min-run-time 2

A stage step is the trainer's step without its monitor (no decoder, clustering
or emergence tracking — the plasticity-only stage): with the drive ``x`` on the
input face,

    s' = propagate(s, w, x=x, leak=0.1, activation="tanh")     (moore, K = 26)
    y  = activity(s, s')
    plasticity_step_(w, y, state, PlasticityRule())            (STDP + BCM + competition + normalisation)

on boundary ("zero", "periodic", "periodic"), fp32, B = 1, C = 1: the
``MemoryConfig()`` for which ``ck.fit_dims(24 GiB)`` names 666×666×333
(147.7 M cells, 3.84 G synapses).

Sizes (``--sizes``, D,H,W in SPEC §1 order, or the words):

- ``preset`` — ``ck.fit_dims(24 GiB)``, 666×666×333;
- ``largest`` — the largest lattice of the top preset's 2:2:1 shape whose
  ``ck.memory_estimate`` fits ``--fraction`` of the device's free memory
  (``PROGRESSION`` stops at 666×666×333, which a 141 GB GPU holds several times).

A size whose estimate exceeds ``--fraction`` of the free memory (GPU:
``torch.cuda.mem_get_info``; CPU: ``MemAvailable``) is refused, not run.

Checks, before anything is timed: one step of the backend on ``GATE_DIMS``
against the reference (s', w, traces, θ within
:data:`benchmarks.harness.GATE_TOLERANCE`); on the timed lattice itself,
after the warm-up steps, s' at ``--spot`` cells (the first, the last and random
ones) recomputed in float64 from s, w and x (catches 32-bit index overflow,
which starts at 2³¹ elements: K·N = 3.84 G here) and every weight inside
[w_min, w_max] and finite.

Reported per size, ``t`` the median of a timed call (``harness.measure``:
``do_bench`` on CUDA), ``N = D·H·W``, ``K = 26``:

- step ms, steps/s = 1 / t_step; propagate (+ activity) ms and plasticity ms apart;
- synapse-updates/s = K·N·B / t_step (every synapse propagates and learns once per step);
- GB/s = the step's minimum bytes / t_step (propagate: 4·(3·N·B·C + K·N) with
  the drive; activity: 4·(2·N·B·C + N·B); the fused plasticity step as in
  :mod:`benchmarks.plasticity`) and its share of the copy roof measured in the same run;
- peak memory: ``torch.cuda.max_memory_allocated`` over allocation and the
  warm-up steps, less what was allocated before, against ``ck.memory_estimate``
  (the ratio estimate / measured); on the CPU not measured here
  (``python -m benchmarks.memory_budget`` measures it).

Exit status 1 when a check fails or a size raises; refused sizes are not failures.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

import cellkern as ck
from cellkern import backends as ck_backends

from . import harness as H
from .plasticity import bytes_moved as plasticity_bytes
from .propagate import parse_size

SUITE = "largest"
STENCIL, BOUNDARY, LEAK = "moore", ("zero", "periodic", "periodic"), 0.1
PRESET_BUDGET = 24 * 2**30
SHAPE = (2, 2, 1)
GATE_DIMS = (20, 18, 17)
SMOKE_DIMS = (24, 24, 12)
RULE = ck.PlasticityRule()
#: |s'| error allowed at the spot-checked cells (fp32 arithmetic against float64)
SPOT_TOLERANCE = 1e-5


def memory_config(batch: int, channels: int) -> ck.MemoryConfig:
    return ck.MemoryConfig(stencil=STENCIL, batch=batch, channels=channels)


def free_memory(device: torch.device) -> int:
    """Bytes a run may take now: the GPU's free memory, the CPU's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh if line.split()[1:]}
        return info.get("MemAvailable", info["MemFree"])
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def largest_dims(budget: int, config: ck.MemoryConfig, shape=SHAPE) -> tuple:
    """The largest ``(shape[0]·a, shape[1]·a, shape[2]·a)`` whose estimate fits ``budget``."""
    lo, hi = 0, 1
    while ck.memory_estimate(tuple(s * hi for s in shape), config) <= budget:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ck.memory_estimate(tuple(s * mid for s in shape), config) <= budget else (lo, mid)
    if lo == 0:
        raise ValueError(f"largest: no {':'.join(map(str, shape))} lattice fits {budget} bytes")
    return tuple(s * lo for s in shape)


def step_bytes(n: int, b: int, c: int, k: int, e: int) -> int:
    """Minimum bytes of one stage step (module docstring)."""
    return e * (3 * n * b * c + k * n) + e * (2 * n * b * c + n * b) + plasticity_bytes("fused", n, b, e)


class Stage:
    """The tensors of one plasticity-only stage and its step (see the module docstring)."""

    def __init__(self, dims, batch, channels, device, backend=None, seed=0):
        self.dims, self.backend = tuple(dims), backend
        g = torch.Generator(device=device).manual_seed(seed)
        K = ck.stencil(STENCIL).K
        self.w = torch.rand((K, *dims), generator=g, device=device).mul_(0.3).add_(RULE.w_min)
        self.s = torch.zeros((batch, channels, *dims), device=device)
        self.x = torch.zeros_like(self.s)
        self.x[:, :, 0] = torch.rand((batch, channels, *dims[1:]), generator=g, device=device)
        self.state = ck.PlasticityState.create(dims, batch, device=device)
        self.kw = dict(stencil=STENCIL, boundary=BOUNDARY, backend=backend)

    def propagate(self):
        s_new = ck.ops.propagate(self.s, self.w, x=self.x, leak=LEAK, activation="tanh", **self.kw)
        return s_new, ck.ops.activity(self.s, s_new)

    def plasticity(self, y):
        ck.ops.plasticity_step_(self.w, y, self.state, RULE, **self.kw)

    def step(self):
        s_new, y = self.propagate()
        self.plasticity(y)
        self.s = s_new


def gate(backend, batch, channels, device, seed) -> tuple:
    """One step of ``backend`` on GATE_DIMS against the reference: ``(ok, {name: max abs err})``."""
    got, ref = (Stage(GATE_DIMS, batch, channels, device, be, seed) for be in (backend, "reference"))
    for st in (got, ref):
        st.s = st.x.clone()  # a state that is not zero, so propagation and learning both act
        st.step()
    names = ("s'", "w", "x_pre", "x_post", "theta")
    pick = lambda st: (st.s, st.w, st.state.x_pre, st.state.x_post, st.state.theta)  # noqa: E731
    return H.gate(pick(got), pick(ref), torch.float32, names=names)


def spot_check(s, w, x, s_new, cells: int, seed: int) -> float:
    """The largest |s'| error at ``cells`` cells (the first, the last, random ones),
    recomputed in float64 from s, w and x (batch 0, channel 0)."""
    D, H_, W = s.shape[-3:]
    n = D * H_ * W
    g = torch.Generator(device="cpu").manual_seed(seed)
    flat = torch.cat([torch.tensor([0, n - 1]), torch.randint(0, n, (max(0, cells - 2),), generator=g)])
    z, y, xx = flat // (H_ * W), (flat // W) % H_, flat % W
    dev = s.device
    agg = torch.zeros(len(flat), dtype=torch.float64)
    for k, (dz, dy, dx) in enumerate(ck.stencil(STENCIL).offset_tuples):
        zz, inside = z + dz, (z + dz >= 0) & (z + dz < D)
        zz = zz.clamp(0, D - 1)
        val = s[0, 0][zz.to(dev), ((y + dy) % H_).to(dev), ((xx + dx) % W).to(dev)].double().cpu()
        wk = w[k][z.to(dev), y.to(dev), xx.to(dev)].double().cpu()
        agg += torch.where(inside, wk * val, 0.0)
    at = (z.to(dev), y.to(dev), xx.to(dev))
    want = (1 - LEAK) * s[0, 0][at].double().cpu() + LEAK * torch.tanh(agg + x[0, 0][at].double().cpu())
    return float((s_new[0, 0][at].double().cpu() - want).abs().max())


def run_size(dims, args, device) -> dict:
    """Check, then time, one size; the row of the report."""
    cfg = memory_config(args.batch, args.channels)
    n, K = math.prod(dims), ck.stencil(STENCIL).K
    est = ck.memory_estimate(dims, cfg)
    free = free_memory(device)
    row = {"size": list(dims), "N": n, "K": K, "B": args.batch, "C": args.channels, "synapses": K * n,
           "estimate_bytes": est, "free_bytes": free, "fraction": args.fraction, "status": None, "error": None,
           "backend": None, "peak_bytes": None, "estimate_over_peak": None}
    if est > args.fraction * free:
        row["status"] = "refused"
        row["error"] = (f"{'x'.join(map(str, dims))} needs {est / 2**30:.1f} GiB (ck.memory_estimate), more than "
                        f"{args.fraction:g} of the {free / 2**30:.1f} GiB free on {device.type}")
        return row
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        stage = Stage(dims, args.batch, args.channels, device, args.backend, args.seed)
        row["backend"] = ck_backends.select(args.backend, device, "largest")[0]
        for _ in range(args.warmup):
            stage.step()
        s_new, y = stage.propagate()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            row["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
            row["estimate_over_peak"] = est / row["peak_bytes"]
        row["setup_and_warmup_s"] = time.perf_counter() - t0
        row["spot_cells"] = args.spot
        row["spot_max_abs_err"] = spot_check(stage.s, stage.w, stage.x, s_new, args.spot, args.seed)
        row["weights_in_bounds"] = bool(torch.isfinite(stage.w).all()) and float(stage.w.min()) >= RULE.w_min \
            and float(stage.w.max()) <= RULE.w_max
        del s_new
        calls = {"step": stage.step, "propagate": stage.propagate, "plasticity": lambda: stage.plasticity(y)}
        t = {name: H.measure(fn, device, args.min_run_time)["median_ms"] for name, fn in calls.items()}
        row.update(step_ms=t["step"], propagate_ms=t["propagate"], plasticity_ms=t["plasticity"],
                   steps_per_s=1e3 / t["step"], synapse_updates_per_s=K * n * args.batch * 1e3 / t["step"],
                   bytes_min=step_bytes(n, args.batch, args.channels, K, 4))
        row["gbps"] = row["bytes_min"] / t["step"] / 1e6
        ok = row["weights_in_bounds"] and row["spot_max_abs_err"] <= SPOT_TOLERANCE
        row["status"] = "ok" if ok else "FAIL"
        del stage, y
    except Exception as exc:  # noqa: BLE001 - a size that breaks is a row of the report
        row["status"], row["error"] = "ERROR", f"{type(exc).__name__}: {exc}"[:4000]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def resolve_sizes(words, device, args) -> list:
    """Dims for the D,H,W words and ``preset``; ``largest`` stays a word, sized
    when its turn comes (:func:`largest_now`)."""
    cfg = memory_config(args.batch, args.channels)
    out = []
    for word in words:
        if word == "preset":
            out.append(ck.fit_dims(PRESET_BUDGET, cfg))
        elif word == "largest":
            out.append("largest")
        else:
            out.append(parse_size(word))
    return list(dict.fromkeys(out))


def largest_now(rows, device, args) -> tuple:
    """``(dims, peak/estimate used)``: the largest lattice for the memory free
    now, the budget shrunk by the largest measured peak/estimate of the sizes
    run before (when a peak passed its estimate) so the size does not run out."""
    over = max([1.0] + [1 / r["estimate_over_peak"] for r in rows if r.get("estimate_over_peak")])
    return largest_dims(int(args.fraction * free_memory(device) / over), memory_config(args.batch, args.channels)), over


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.largest",
                                description="One plasticity-only stage at the seeds' largest lattice and at the "
                                            "largest lattice the device holds: steps/s, synapse-updates/s, peak "
                                            "memory against ck.memory_estimate.")
    p.add_argument("--sizes", nargs="+", default=None, metavar="D,H,W|preset|largest",
                   help="lattices: D,H,W, preset (ck.fit_dims(24 GiB) = 666x666x333) or largest (the largest 2:2:1 "
                        "lattice within --fraction of the free memory). Default: preset largest "
                        f"(--smoke: {','.join(map(str, SMOKE_DIMS))})")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="Default: cuda if available, else cpu")
    p.add_argument("--backend", default=None, help="the ops' backend. Default: the ops' own choice for the device")
    p.add_argument("--batch", type=int, default=1, help="B. Default: 1")
    p.add_argument("--channels", type=int, default=1, help="C. Default: 1")
    p.add_argument("--fraction", type=float, default=0.9,
                   help="share of the free memory a size may need (estimate). Default: 0.9")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the checks. Default: 2")
    p.add_argument("--spot", type=int, default=256, help="cells of the spot check. Default: 256")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="seconds per timed call (harness.measure). Default: 1.0 (--smoke: 0.05)")
    p.add_argument("--smoke", action="store_true", help=f"a {'x'.join(map(str, SMOKE_DIMS))} lattice, short timings")
    p.add_argument("--no-json", action="store_true", help="do not write benchmarks/results/*.json")
    p.add_argument("--seed", type=int, default=0, help="Default: 0")
    return p


def table(rows: list, roof_gbps: float) -> str:
    cols = [("size DxHxW", "<"), ("synapses", ">"), ("backend", "<"), ("check", "<"), ("step ms", ">"),
            ("prop ms", ">"), ("plast ms", ">"), ("steps/s", ">"), ("syn-upd/s", ">"), ("GB/s", ">"),
            ("roof", ">"), ("estimate", ">"), ("peak", ">"), ("est/peak", ">")]
    lines = []
    for r in rows:
        timed = r.get("step_ms") is not None
        gib = lambda b: "-" if b is None else f"{b / 2**30:.2f} GiB"  # noqa: E731
        lines.append(["x".join(map(str, r["size"])), H.si(r["synapses"]), r["backend"] or "-", r["status"],
                      H.fmt_ms(r["step_ms"]) if timed else "-", H.fmt_ms(r["propagate_ms"]) if timed else "-",
                      H.fmt_ms(r["plasticity_ms"]) if timed else "-", f"{r['steps_per_s']:.3g}" if timed else "-",
                      H.si(r.get("synapse_updates_per_s")), f"{r['gbps']:.3g}" if timed else "-",
                      f"{100 * r['gbps'] / roof_gbps:.2g}%" if timed and roof_gbps else "-",
                      gib(r["estimate_bytes"]), gib(r["peak_bytes"]),
                      "-" if r["estimate_over_peak"] is None else f"{r['estimate_over_peak']:.3f}"])
    return H.format_table(cols, lines)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if not 0 < args.fraction <= 1:
        parser.error(f"--fraction must be in (0, 1], got {args.fraction}")
    for name in ("batch", "channels", "warmup", "spot"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    device = torch.device(args.device)
    if args.min_run_time is None:
        args.min_run_time = 0.05 if args.smoke else 1.0
    words = args.sizes or ([",".join(map(str, SMOKE_DIMS))] if args.smoke else ["preset", "largest"])
    try:
        sizes = resolve_sizes([w for v in words for w in v.split()], device, args)
        if args.backend is not None:
            ck_backends.select(args.backend, device, "--backend")
    except (argparse.ArgumentTypeError, ValueError, RuntimeError, TypeError) as exc:
        parser.error(str(exc))
    info = H.describe_machine(device)
    print(f"cellkern {ck.__version__} · largest: one plasticity-only stage ({STENCIL}, {BOUNDARY}, fp32, "
          f"B={args.batch}, C={args.channels})")
    roof = H.copy_roof(device, min_run_time=0.5 if not args.smoke else 0.1)
    print(H.format_machine(info, roof), flush=True)
    ok, errs = gate(args.backend, args.batch, args.channels, device, args.seed)
    print(f"gate     one step on {'x'.join(map(str, GATE_DIMS))} against the reference: "
          f"{'ok' if ok else 'FAIL'} (max abs err " + ", ".join(f"{k} {v:.2g}" for k, v in errs.items()) + ")",
          flush=True)
    rows = []
    for dims in sizes:
        over = None
        if dims == "largest":
            dims, over = largest_now(rows, device, args)
        print(f"  {'x'.join(map(str, dims))} ...", end="", flush=True)
        row = run_size(dims, args, device)
        row["largest_sized_with_peak_over_estimate"] = over
        rows.append(row)
        print(f" {row['status']}" + (f" {row['step_ms']:.2f} ms/step" if row.get("step_ms") else ""), flush=True)
    print()
    print(table(rows, roof["gbps"]))
    for r in rows:
        if r["error"]:
            print(f"{'x'.join(map(str, r['size']))}: {r['error'].splitlines()[0][:200]}")
    if not args.no_json:
        payload = {"suite": SUITE, "machine": info, "roof": roof, "gate": {"ok": ok, "max_abs_err": errs,
                                                                          "dims": list(GATE_DIMS)},
                   "settings": {"stencil": STENCIL, "boundary": BOUNDARY, "leak": LEAK, "dtype": "float32",
                                "batch": args.batch, "channels": args.channels, "backend": args.backend,
                                "fraction": args.fraction, "warmup": args.warmup,
                                "min_run_time": args.min_run_time, "seed": args.seed, "smoke": args.smoke},
                   "rows": rows}
        print(f"\nwrote {H.write_json(SUITE, payload, info)}")
    failed = not ok or any(r["status"] in ("FAIL", "ERROR") for r in rows)
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
