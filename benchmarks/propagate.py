"""Benchmark of ``cellkern.ops.propagate`` on every backend, correctness-gated.

    python -m benchmarks.propagate                  # the default sweep
    python -m benchmarks.propagate --quick --no-json
    python -m benchmarks.propagate --sizes 64,64,48 --bc 16 --backends cpu compile

The op measured is one fused cell update (SPEC §2) with the Moore stencil
(K = 26), a periodic boundary, tanh and leak α = 0.1, on a random state
``s ~ U(-1, 1)`` ``[B, C, D, H, W]`` and weights ``w ~ U(0, 0.1)`` ``[K, D, H, W]``:

    s' = (1-α)·s + α·tanh(Σ_k w[k,i] · s[b,c,nbr(i,k)])

Sizes are lattice dims ``(D, H, W)`` in SPEC §1 order (depth z, height y,
width x): ``48,48,36`` is D=48, H=48, W=36. ``B·C`` is split into a batch and
channels as evenly as it goes (16 → B=4, C=4; ``4x2`` sets them explicitly).

Backends: every cellkern backend that loaded and runs on the device
(``cellkern.available_backends()``; Triton only on CUDA — interpreted Triton
is never benchmarked), ``reference`` (the eager reference op) and
``compile`` (``torch.compile`` of the reference op; when it fails, the row
keeps the error and the run goes on).

Passes: ``fwd`` (inputs do not require grad) and ``fwd+bwd`` (``s`` and ``w``
require grad; ``torch.autograd.grad`` with the fixed upstream gradient
``g = torch.ones_like(s')``).

Correctness gate: before it is timed, every backend's output (and, for
fwd+bwd, ``ds`` and ``dw``) is compared in the same run with the eager
reference within the dtype's tolerance of
:data:`benchmarks.harness.GATE_TOLERANCE`; a mismatch marks the row ``FAIL``.
The reference runs first in each pass and the result of its last timed call is
the gate for the others, so the slow reference runs no extra call. A gated
call's wall time (not reported) sizes the measurement: a row gets at least 3
runs unless that would take over ``--max-row-time`` seconds (the eager
reference at 128³ with B·C=16), then as many as fit, at least one.

Reported per row, with ``t`` the median time, ``N = D·H·W``, ``K = 26`` and
``e`` the element size of the dtype:

- cell-updates/s     = N·B·C / t
- synapse-updates/s  = N·K·B / t     (B the batch; a weight is shared by the C channels)
- effective GB/s     = minimum bytes moved / t, where
      fwd      bytes = e·(N·B·C  [read s] + K·N  [read w] + N·B·C  [write s'])
                     = e·(2·N·B·C + K·N)
      fwd+bwd  bytes = fwd + e·(N·B·C [read g] + N·B·C [read s] + K·N [read w]
                                + N·B·C [write ds] + K·N [write dw])
                     = e·(5·N·B·C + 3·K·N)
  (the minimum: tensors a backend saves for backward, such as the fp32
  pre-activation, are not counted)
- roof               = effective GB/s / the copy bandwidth measured in the
                       same run (``dst.copy_(src)``, 256 MiB, 2·bytes/time)
- vs eager / vs compile = the reference's (compiled reference's) median time
                       over this row's, in the same pass and configuration.

The exit status is 1 when a cellkern backend fails its gate or raises (a
failing ``torch.compile`` is recorded, not an error of cellkern).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import warnings

import torch

import cellkern as ck
from cellkern import backends as ck_backends

from . import harness as H

SUITE = "propagate"
STENCIL, BOUNDARY, ACTIVATION, LEAK = "moore", "periodic", "tanh", 0.1
DEFAULT_SIZES = ("16,16,16", "48,48,36", "128,128,128")
DEFAULT_BC = ("1", "16")
QUICK_SIZES = ("6,5,7",)
QUICK_BC = ("16",)
PASSES = ("fwd", "fwd+bwd")
#: issue 18's roof shares for the cuda backend at 128³, moore, fp32: (pass, B·C) → share (None: any B·C)
ROOF_TARGETS = {("fwd", 1): 0.80, ("fwd", 16): 0.60, ("fwd+bwd", None): 0.50}
TARGET_SIZE = (128, 128, 128)


def roof_target(row: dict, dtype: torch.dtype):
    """The share of the copy roof issue 18 asks of this row (None: no target at its size or dtype)."""
    if tuple(row["size"]) != TARGET_SIZE or dtype != torch.float32:
        return None
    bc = row["B"] * row["C"]
    return ROOF_TARGETS.get((row["pass"], bc), ROOF_TARGETS.get((row["pass"], None)))


def acceptance(rows: list, roof_gbps: float, dtype: torch.dtype) -> list:
    """Issue 18's figures of this run (:func:`benchmarks.harness.acceptance`)."""
    return H.acceptance(rows, roof_gbps, lambda r: f"{'x'.join(map(str, r['size']))} {r['B']}x{r['C']} {r['pass']}",
                        lambda r: roof_target(r, dtype))


def parse_size(text: str) -> tuple:
    parts = [p for p in text.replace("x", ",").replace("×", ",").split(",") if p.strip()]
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"a size is D,H,W with three positive ints, got {text!r}")
    return tuple(int(p) for p in parts)


def split_bc(text: str) -> tuple:
    """``"16"`` → (4, 4): C the largest divisor of B·C not above √(B·C); ``"BxC"`` as given."""
    text = str(text).strip().lower().replace("×", "x")
    try:
        if "x" in text:
            b, c = (int(v) for v in text.split("x"))
        else:
            bc = int(text)
            c = max(d for d in range(1, math.isqrt(bc) + 1) if bc % d == 0) if bc > 0 else 0
            b = bc // c if c else 0
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bc takes B·C (e.g. 16) or BxC (e.g. 4x4), got {text!r}") from None
    if b <= 0 or c <= 0:
        raise argparse.ArgumentTypeError(f"--bc must be positive, got {text!r}")
    return b, c


def _split_words(values) -> list:
    return [w for v in values for w in v.replace(",", " ").split()] if values else []


def _split_sizes(values) -> list:
    return [w for v in values for w in v.split()]


def cellkern_backends(device: torch.device) -> list:
    """cellkern backends (other than the reference) that loaded and run natively on ``device``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        names = ck.available_backends()
    # triton "supports" CPU tensors only under TRITON_INTERPRET=1: never timed.
    return [n for n in names if n != "reference" and ck_backends.supports(n, device)
            and not (n == "triton" and device.type != "cuda")]


def default_backends(device: torch.device) -> list:
    return ["reference", "compile", *cellkern_backends(device)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.propagate",
        description="Time cellkern.ops.propagate (moore, periodic, tanh, leak 0.1) forward and "
                    "forward+backward on every backend, each checked against the eager reference first.",
    )
    p.add_argument("--sizes", nargs="+", default=None, metavar="D,H,W",
                   help="lattice dims in SPEC §1 order (D, H, W) = (depth z, height y, width x): "
                        "48,48,36 means D=48, H=48, W=36. Default: " + " ".join(DEFAULT_SIZES)
                        + " (--quick: " + " ".join(QUICK_SIZES) + ")")
    p.add_argument("--bc", nargs="+", default=None, metavar="B·C",
                   help="batch×channels; 16 runs as B=4, C=4 (C = the largest divisor ≤ √(B·C)); "
                        "BxC sets both. Default: " + " ".join(DEFAULT_BC) + " (--quick: " + " ".join(QUICK_BC) + ")")
    p.add_argument("--backends", nargs="+", default=None, metavar="NAME",
                   help="any of reference, compile (torch.compile of the reference op), cpu, triton, cuda. "
                        "Default: reference, compile and every available backend that runs on the device")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where to run. Default: cuda if available, else cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(H.DTYPES), metavar="{float32,float16,bfloat16,float64}",
                   help="dtype of s and w (fp32, fp16, bf16, fp64 also work). Default: float32")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: a tiny lattice, B·C=16 and short measurements")
    p.add_argument("--no-json", action="store_true", help="do not write benchmarks/results/*.json")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="seconds per measurement (CPU: blocked_autorange; CUDA: do_bench rep). "
                        "Default: 0.5 on CPU, 0.2 on CUDA, 0.02 with --quick")
    p.add_argument("--max-row-time", type=float, default=None,
                   help="seconds a slow row may take before it gets fewer than 3 runs. Default: 20 (--quick: 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (torch.set_num_threads). Default: torch's own choice")
    p.add_argument("--seed", type=int, default=0, help="seed of the random s and w. Default: 0")
    return p


def _reference_op(s, w):
    return ck.ops.propagate(s, w, leak=LEAK, activation=ACTIVATION, stencil=STENCIL,
                            boundary=BOUNDARY, backend="reference")


def make_op(backend: str):
    """``f(s, w) -> s'`` for a backend name (``compile``: a fresh torch.compile of the reference op)."""
    if backend == "compile":
        return torch.compile(_reference_op, dynamic=False)

    def op(s, w):
        return ck.ops.propagate(s, w, leak=LEAK, activation=ACTIVATION, stencil=STENCIL,
                                boundary=BOUNDARY, backend=backend)

    return op


def make_call(op, pass_: str, s, w, g):
    """A no-argument callable of one pass; it returns ``(s',)`` or ``(s', ds, dw)``."""
    if pass_ == "fwd":
        return lambda: (op(s, w),)
    sg = s.detach().clone().requires_grad_(True)
    wg = w.detach().clone().requires_grad_(True)

    def fwd_bwd():
        out = op(sg, wg)
        ds, dw = torch.autograd.grad(out, (sg, wg), g)
        return out, ds, dw

    return fwd_bwd


def bytes_moved(pass_: str, n: int, b: int, c: int, k: int, esize: int) -> int:
    fwd = 2 * n * b * c + k * n
    return esize * (fwd if pass_ == "fwd" else 5 * n * b * c + 3 * k * n)


def _new_row(backend, pass_, cfg) -> dict:
    return {"size": list(cfg["dims"]), "N": cfg["N"], "B": cfg["B"], "C": cfg["C"], "K": cfg["K"],
            "pass": pass_, "backend": backend, "status": None, "error": None, "max_abs_err": None,
            "compile_s": None, "graph_breaks": None, "peak_mib": None,
            "median_ms": None, "runs": None, "number_per_run": None, "iqr_ms": None}


def _add_rates(row: dict, esize: int) -> dict:
    n, b, c, k = row["N"], row["B"], row["C"], row["K"]
    t = row["median_ms"] * 1e-3
    row["cell_updates_per_s"] = n * b * c / t
    row["synapse_updates_per_s"] = n * k * b / t
    row["bytes_min"] = bytes_moved(row["pass"], n, b, c, k, esize)
    row["gbps"] = row["bytes_min"] / t / 1e9
    return row


def reference_row(pass_, s, w, g, cfg, args, device, predicted_s=None) -> tuple:
    """Time the eager reference and keep the result of its last timed call as
    the gate values of the other backends, so the slow reference runs no extra
    call. ``predicted_s`` (scaled from the previous configuration) sizes the
    measurement; when it was too low for 3 runs within ``--max-row-time``, the
    row is measured again with the time just seen.

    Returns ``(row, ref)`` with ``ref`` = ``(s',)`` or ``(s', ds, dw)``.
    """
    call = make_call(make_op("reference"), pass_, s, w, g)
    kept = {}

    def keep():
        kept["result"] = call()

    row = _new_row("reference", pass_, cfg)
    mrt = H.min_run_time_for(predicted_s, args.min_run_time, 3, args.max_row_time) if predicted_s else args.min_run_time
    row.update(H.measure(keep, device, mrt))
    median_s = row["median_ms"] * 1e-3
    if row["runs"] is not None and row["runs"] < 3 and 3 * median_s <= args.max_row_time:
        row.update(H.measure(keep, device, H.min_run_time_for(median_s, args.min_run_time, 3, args.max_row_time)))
    ref = tuple(x.detach() for x in kept["result"])
    row["status"] = "ref"
    row["max_abs_err"] = {name: 0.0 for name, _ in zip(("out", "ds", "dw"), ref)}
    return _add_rates(row, s.element_size()), ref


def run_row(backend, op, pass_, s, w, g, ref, cfg, args, device) -> dict:
    """Gate ``backend`` against ``ref`` on its first call(s), then time it."""
    row = _new_row(backend, pass_, cfg)
    try:
        call = make_call(op, pass_, s, w, g)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        breaks0 = sum(torch._dynamo.utils.counters["graph_break"].values())
        got, est = H.call_once(call, device)
        if device.type == "cuda":
            row["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        if backend == "compile":
            row["compile_s"] = est  # the first call traces and compiles
            row["graph_breaks"] = sum(torch._dynamo.utils.counters["graph_break"].values()) - breaks0
            got, est = H.call_once(call, device)
        ok, row["max_abs_err"] = H.gate(got, ref, s.dtype, names=("out", "ds", "dw"))
        row["status"] = "ok" if ok else "FAIL"
        del got
        row.update(H.measure(call, device, H.min_run_time_for(est, args.min_run_time, 3, args.max_row_time)))
    except Exception as exc:  # noqa: BLE001 - a broken backend is a row of the report, not the end of it
        row["status"] = "ERROR"
        row["error"] = f"{type(exc).__name__}: {exc}"[:4000]
        return row
    return _add_rates(row, s.element_size())


def table(rows: list, roof_gbps: float, device: torch.device) -> tuple:
    """The fixed-width result table, and its footnotes (errors)."""
    cols = [("size DxHxW", "<"), ("BxC", "<"), ("pass", "<"), ("backend", "<"), ("check", "<"),
            ("median ms", ">"), ("runs", ">"), ("cell-upd/s", ">"), ("syn-upd/s", ">"),
            ("GB/s", ">"), ("roof", ">"), ("vs eager", ">"), ("vs compile", ">")]
    if device.type == "cuda":
        cols.append(("peak MiB", ">"))
    lines, seps, notes, prev = [], [], [], None
    for r in rows:
        cfg = (tuple(r["size"]), r["B"], r["C"])
        if cfg != prev:
            seps.append(len(lines))
            prev = cfg
        check = r["status"]
        if r["error"]:
            notes.append(r["error"].splitlines()[0][:160])
            check = f"{check} [{len(notes)}]"
        timed = r["median_ms"] is not None and r["status"] != "ERROR"
        cells = [
            "x".join(map(str, r["size"])), f"{r['B']}x{r['C']}", r["pass"], r["backend"], check,
            H.fmt_ms(r["median_ms"]) if timed else "-",
            str(r["runs"]) if timed and r["runs"] is not None else "-",
            H.si(r.get("cell_updates_per_s")) if timed else "-",
            H.si(r.get("synapse_updates_per_s")) if timed else "-",
            f"{r['gbps']:.3g}" if timed else "-",
            f"{100 * r['gbps'] / roof_gbps:.2g}%" if timed and roof_gbps else "-",
            H.fmt_ratio(r.get("speedup_eager")), H.fmt_ratio(r.get("speedup_compile")),
        ]
        if device.type == "cuda":
            cells.append(f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-")
        lines.append(cells)
    return H.format_table(cols, lines, seps), notes


def _progress(dims, b, c, pass_, name) -> None:
    print(f"  {'x'.join(map(str, dims))} {b}x{c} {pass_} {name} ...", end="", flush=True)


def _progress_done(row) -> None:
    timed = row["median_ms"] is not None and row["status"] != "ERROR"
    print(f" {row['status']}" + (f" {row['median_ms']:.3f} ms" if timed else ""), flush=True)


def resolve(args, parser) -> None:
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    device = torch.device(args.device)
    try:
        args.sizes = [parse_size(t) for t in _split_sizes(args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES))]
        args.bc = [split_bc(t) for t in _split_words(args.bc or (QUICK_BC if args.quick else DEFAULT_BC))]
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.min_run_time is None:
        args.min_run_time = 0.02 if args.quick else (0.2 if device.type == "cuda" else 0.5)
    if args.max_row_time is None:
        args.max_row_time = 2.0 if args.quick else 20.0
    names = _split_words(args.backends) or default_backends(device)
    usable = ["reference", "compile", *cellkern_backends(device)]
    for name in names:
        if name not in usable:
            known = ("reference", "compile", *ck_backends.NAMES)
            if name not in known:
                parser.error(f"--backends: unknown backend {name!r}; known: {', '.join(known)}")
            reason = ck.backend_status().get(name, "")
            if reason == "available":
                reason = f"does not run natively on {device.type} tensors"
            parser.error(f"--backends: {name!r} cannot be benchmarked on {device.type}: {reason}")
    args.backends = list(dict.fromkeys(names))
    args.dtype = H.DTYPES[args.dtype]


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve(args, parser)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = H.describe_machine(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        status = ck.backend_status()
    print(f"cellkern {ck.__version__} · propagate: {STENCIL}, {BOUNDARY}, {ACTIVATION}, leak {LEAK}, "
          f"{str(args.dtype).replace('torch.', '')}")
    print("backends " + "; ".join(f"{n}: {v}" for n, v in status.items()))
    if H.machine_busy(info):
        print(f"WARNING  load average {info['load_average_1min']} on {info['cpu_cores']} cores: "
              "other work shares the CPUs, timings are unreliable")
    roof = H.copy_roof(device, min_run_time=max(0.2, min(1.0, args.min_run_time * 2)))
    print(H.format_machine(info, roof), flush=True)

    k = ck.stencil(STENCIL).K
    rows, last_ref = [], {}
    for dims in args.sizes:
        for b, c in args.bc:
            cfg = {"dims": dims, "B": b, "C": c, "N": dims[0] * dims[1] * dims[2], "K": k}
            torch.manual_seed(args.seed)
            s = (torch.rand(b, c, *dims, device=device) * 2 - 1).to(args.dtype)
            w = (torch.rand(k, *dims, device=device) * 0.1).to(args.dtype)
            g = torch.ones_like(s)
            # A fresh compile per configuration, static shapes: dynamo's cache is keyed
            # on the code object, so without a reset the later sizes would hit its
            # recompile limit and silently run eager.
            torch._dynamo.reset()
            ops = {name: make_op(name) for name in args.backends if name != "reference"}
            for pass_ in PASSES:
                if "reference" in args.backends:
                    prev = last_ref.get(pass_)
                    predicted = None
                    if prev is not None:
                        scale = bytes_moved(pass_, cfg["N"], b, c, k, 1) / bytes_moved(
                            pass_, prev["N"], prev["B"], prev["C"], k, 1)
                        predicted = prev["median_ms"] * 1e-3 * scale
                    _progress(dims, b, c, pass_, "reference")
                    row, ref = reference_row(pass_, s, w, g, cfg, args, device, predicted)
                    last_ref[pass_] = row
                    _progress_done(row)
                    rows.append(row)
                else:
                    ref = tuple(x.detach() for x in make_call(make_op("reference"), pass_, s, w, g)())
                for name in args.backends:
                    if name == "reference":
                        continue
                    _progress(dims, b, c, pass_, name)
                    row = run_row(name, ops[name], pass_, s, w, g, ref, cfg, args, device)
                    _progress_done(row)
                    rows.append(row)
                del ref
            del s, w, g, ops
    H.add_speedups(rows, key=lambda r: (tuple(r["size"]), r["B"], r["C"], r["pass"]))
    if hasattr(os, "getloadavg"):
        info["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    text, notes = table(rows, roof["gbps"], device)
    print()
    print(text)
    for i, note in enumerate(notes, 1):
        print(f"[{i}] {note}")
    accepted = acceptance(rows, roof["gbps"], args.dtype)
    if accepted:
        print(H.format_acceptance(accepted))
    end = info.get("load_average_1min_end")
    own = torch.get_num_threads() if device.type == "cpu" else 1
    if end is not None and H.machine_busy({**info, "load_average_1min": end}, own_threads=own):
        print(f"WARNING  load average {end} on {info['cpu_cores']} cores at the end: other work shared the CPUs, "
              "timings are unreliable (medians on multiples of the 4 ms scheduler tick give it away)")

    if not args.no_json:
        payload = {
            "suite": SUITE,
            "machine": info,
            "roof": roof,
            "settings": {"stencil": STENCIL, "boundary": BOUNDARY, "activation": ACTIVATION, "leak": LEAK,
                         "dtype": str(args.dtype).replace("torch.", ""), "sizes": [list(d) for d in args.sizes],
                         "bc": [list(x) for x in args.bc], "backends": args.backends,
                         "min_run_time": args.min_run_time, "max_row_time": args.max_row_time,
                         "seed": args.seed, "quick": args.quick,
                         "tolerance": dict(zip(("rtol", "atol"), H.GATE_TOLERANCE[args.dtype]))},
            "backend_status": status,
            "rows": rows,
            "acceptance": accepted,
        }
        labels = [f"{'x'.join(map(str, r['size']))} {r['B']}x{r['C']} {r['pass']}"
                  for r in rows if r["backend"] == args.backends[0]]
        series = {name: [r.get("synapse_updates_per_s") if r["status"] in ("ref", "ok") else None
                         for r in rows if r["backend"] == name] for name in args.backends}
        H.save_results(SUITE, payload, info, series, labels, "propagate", "synapse-updates/s")
    return H.exit_code(rows)


if __name__ == "__main__":
    sys.exit(main())
