"""Benchmark of the plasticity ops (SPEC §4) on every backend, correctness-gated.

    python -m benchmarks.plasticity                  # the default sweep
    python -m benchmarks.plasticity --quick --no-json
    python -m benchmarks.plasticity --sizes 48,48,36 --batch 16 --backends reference cpu

Lattice: Moore stencil (K = 26), boundary ("zero", "periodic", "periodic") on
(z, y, x), dims (D, H, W) in SPEC §1 order, batch B. Inputs: w ~ U(0.1, 2.0),
y ~ U(0, 0.05) (with θ_act = 0.01 about 80 % of the cells spike, half after
inhibition, a few % win), a fresh ``PlasticityState`` and ``PlasticityRule()``
(STDP + BCM + competition + normalisation, SPEC §8 parameters). Each backend
is timed on its own copy of the inputs, which the in-place calls keep updating
(traces stay bounded, θ drifts: harmless for timing).

Rows, one call each: ``stdp`` = stdp_(w, z, x_pre, x_post, gate=win) with
z = (y' > θ_act); ``bcm`` = bcm_(w, y', θ, gate=win); ``competition`` =
lateral_inhibition(y) → local_winners(y'); ``normalize`` =
heterosynaptic_normalize_(w, target, where=win.any(0)); ``sequence`` = the
rules as the fused step needs them: lateral_inhibition → local_winners → z →
synapse_l1 (Σ|w| before) → stdp_ → bcm_ → heterosynaptic_normalize_;
``fused`` = plasticity_step_(w, y, state, rule).

Backends: the eager ``reference``, every cellkern backend that runs natively on
the device and has the plasticity kernels, and ``compile`` (torch.compile of
the reference fused step, ``fused`` row only; not in ``--quick``: compiling
takes a minute on a small CPU). The reference and compile build [B, K, D, H, W]
temporaries and run only where B·K·N <= ``--reference-limit`` (else ``skipped``).

Correctness gate: before timing, every op of every backend runs once on fresh
copies of the inputs and is compared with the reference (w, traces, θ, y', win)
within :data:`benchmarks.harness.GATE_TOLERANCE`, on the timed lattice when
the reference runs there, else on ``GATE_DIMS`` with the same B. A mismatch
marks the row ``FAIL`` (exit status 1). Winners are compared exactly, except
at near-ties: a cell whose ``y'`` lies within the tolerance of its
neighbourhood maximum may flip (a last-bit difference of ``y'`` decides it);
such flips are counted in the row's ``near_tie_flips`` (:func:`near_tie_gate`).

Reported per row, with ``t`` the median time, ``N = D·H·W``, ``K = 26``, ``e``
the element size of w and the state (one dtype, ``--dtype``), bool = 1 byte:

- synapse-updates/s = K·N / t (each synapse updated once per call; the batch is
  averaged into one update). ``competition`` updates no synapse: the same K·N / t
  keeps the rows comparable.
- effective GB/s = minimum bytes / t, with minimum bytes
      fused, sequence  e·(2·K·N [w read+write] + B·N [y] + 4·B·N [x_pre, x_post read+write]
                          + 2·N [θ read+write])          (+ K·N bool with a mask: none here)
      stdp             e·(2·K·N + B·N [z] + 4·B·N [traces]) + B·N [gate]
      bcm              e·(2·K·N + B·N [y'] + 2·N [θ]) + B·N [gate]
      competition      e·(B·N [y] + B·N [y' write]) + B·N [win write]
      normalize        e·2·K·N + 4·N [fp32 target] + N [where]
  The sequence is counted with the bytes of the fused step (the same work):
  its extra passes over w are what fusion saves. A kernel may skip the cells
  that nothing updates (normalize: where = win.any(0), a few % of the cells at
  B=1, kept in the JSON as ``where_share``); then its GB/s can pass the roof.
- roof = GB/s / the copy bandwidth measured in the same run;
  vs eager / vs compile = the reference's (compiled reference's) median over this row's;
  fused/seq = this backend's sequence median over its fused median.
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
from .propagate import _split_sizes, _split_words, cellkern_backends, parse_size

SUITE = "plasticity"
STENCIL, BOUNDARY = "moore", ("zero", "periodic", "periodic")
DEFAULT_SIZES, DEFAULT_BATCH = ("48,48,36", "128,128,128"), ("1", "16")
QUICK_SIZES, QUICK_BATCH = ("6,5,7",), ("3",)
GATE_DIMS = (20, 18, 17)
OPS = ("stdp", "bcm", "competition", "normalize", "sequence", "fused")
#: issue 18's roof share for the cuda backend's fused step at 128³, B = 1, fp32
FUSED_ROOF_TARGET = 0.75


def roof_target(row: dict, dtype: torch.dtype):
    """The share of the copy roof issue 18 asks of this row (None: no target for it)."""
    if row["op"] == "fused" and tuple(row["size"]) == (128, 128, 128) and row["B"] == 1 and dtype == torch.float32:
        return FUSED_ROOF_TARGET
    return None


def acceptance(rows: list, roof_gbps: float, dtype: torch.dtype) -> list:
    """Issue 18's figures of this run (:func:`benchmarks.harness.acceptance`)."""
    return H.acceptance(rows, roof_gbps, lambda r: f"{'x'.join(map(str, r['size']))} B={r['B']} {r['op']}",
                        lambda r: roof_target(r, dtype))
RULE = ck.PlasticityRule()
KERNELS = ("plasticity_", "lateral_inhibition", "local_winners", "heterosynaptic_normalize_")
K = ck.stencil(STENCIL).K


def plasticity_backends(device: torch.device) -> tuple:
    """``(names, {name: why not})``: the fast backends on ``device`` that have every plasticity kernel."""
    names, missing = [], {}
    for n in cellkern_backends(device):
        mod = ck_backends.select(n, device, "benchmark")[1]
        lacking = [f for f in KERNELS if not hasattr(mod, f)]
        if lacking:
            missing[n] = "no plasticity kernels yet (" + ", ".join(lacking) + ")"
        else:
            names.append(n)
    return names, missing


def make_inputs(dims, b, dtype, device, seed, be="reference") -> dict:
    """The op inputs; y', win and z come from backend ``be`` (the reference, where it is cheap)."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand((K, *dims), generator=g) * 1.9 + 0.1).to(device, dtype)
    y = (torch.rand((b, *dims), generator=g) * 0.05).to(device, dtype)
    st = ck.PlasticityState.create(dims, b, dtype=dtype, device=device)
    kw = dict(stencil=STENCIL, boundary=BOUNDARY, backend=be)
    yp = ck.ops.lateral_inhibition(y, beta=RULE.competition.beta, **kw)
    win = ck.ops.local_winners(yp, RULE.activity_threshold, **kw)
    # a target 5 % off Σ|w| makes the normalize gate scale w (later calls rescale by ~1: same cost)
    jitter = 0.95 + 0.1 * torch.rand(dims, generator=g).to(device)
    target = ck.ops.synapse_l1(w, stencil=STENCIL, boundary=BOUNDARY) * jitter
    return {"w": w, "y": y, "x_pre": st.x_pre, "x_post": st.x_post, "theta": st.theta, "yp": yp, "win": win,
            "z": (yp > RULE.activity_threshold).to(dtype), "target": target, "where": win.any(0)}


def neighbourhood_gap(yp):
    """``y'[b,i] − max_k y'[b,nbr(i,k)]`` (0 outside the zero boundary), fp64."""
    y = yp.double()
    best = torch.full_like(y, -math.inf)
    zero = tuple(b == "zero" for b in ck.parse_boundary(BOUNDARY))
    for o in ck.stencil(STENCIL).offset_tuples:
        sh = torch.roll(y, shifts=tuple(-d for d in o), dims=(1, 2, 3))
        for ax, d in enumerate(o):
            if zero[ax] and d:  # neighbours beyond a zero face read 0
                n = y.shape[ax + 1]
                sh.narrow(ax + 1, n - d if d > 0 else 0, abs(d)).zero_()
        best = torch.maximum(best, sh)
    return y - best


def near_tie_gate(got, ref, names, dtype) -> tuple:
    """The winner gate, forgiving flips at near-ties: a cell whose winner differs
    from the reference passes when its ``y'`` is within the dtype's tolerance of
    its neighbourhood maximum (a last-bit difference of ``y'`` decides such a
    tie). Every other tensor must pass :func:`H.gate` as usual. Returns
    ``(ok, number of forgiven cells)``."""
    i_win, i_yp = names.index("win"), names.index("y'")
    rest = [k for k in range(len(names)) if k not in (i_win,)]
    ok, _ = H.gate([got[k] for k in rest], [ref[k] for k in rest], dtype, names=[names[k] for k in rest])
    rtol, atol = H.GATE_TOLERANCE[dtype]
    yp = ref[i_yp].double()
    tol = atol * max(1.0, yp.abs().max().item()) + rtol * yp.abs()
    flips = got[i_win].cpu() != ref[i_win].cpu()
    tie = (neighbourhood_gap(yp).abs() <= tol).cpu()
    return ok and bool((~flips | tie).all()), int(flips.sum())


def clone(inputs: dict) -> dict:
    return {k: v.clone() for k, v in inputs.items()}


def _stdp(I, be):
    s = RULE.stdp
    ck.ops.stdp_(I["w"], I["z"], I["x_pre"], I["x_post"], a_plus=s.a_plus, a_minus=s.a_minus, tau_plus=s.tau_plus,
                 tau_minus=s.tau_minus, dt=RULE.dt, lr=s.lr, w_min=RULE.w_min, w_max=RULE.w_max,
                 weight_dependence=s.weight_dependence, gate=I["win"], stencil=STENCIL, boundary=BOUNDARY,
                 backend=be)


def _bcm(I, yp, win, be):
    c = RULE.bcm
    ck.ops.bcm_(I["w"], yp, I["theta"], lr=c.lr, tau_theta=c.tau_theta, decay=c.decay, w_min=RULE.w_min,
                w_max=RULE.w_max, theta_min=c.theta_min, theta_max=c.theta_max, gate=win, stencil=STENCIL,
                boundary=BOUNDARY, backend=be)


def _competition(y, be):
    kw = dict(stencil=STENCIL, boundary=BOUNDARY, backend=be)
    yp = ck.ops.lateral_inhibition(y, beta=RULE.competition.beta, **kw)
    return yp, ck.ops.local_winners(yp, RULE.activity_threshold, **kw)


def _sequence(I, be):
    yp, win = _competition(I["y"], be)
    z = (yp > RULE.activity_threshold).to(yp.dtype)
    before = ck.ops.synapse_l1(I["w"], stencil=STENCIL, boundary=BOUNDARY)
    _stdp({**I, "z": z, "win": win}, be)
    _bcm(I, yp, win, be)
    ck.ops.heterosynaptic_normalize_(I["w"], before, where=win.any(0), stencil=STENCIL, boundary=BOUNDARY,
                                     backend=be)
    return yp, win


def _fused(w, y, x_pre, x_post, theta, be="reference"):
    state = ck.PlasticityState(x_pre, x_post, theta)
    return ck.ops.plasticity_step_(w, y, state, RULE, stencil=STENCIL, boundary=BOUNDARY, backend=be)


STATE = ("w", "x_pre", "x_post", "theta")
GATE_NAMES = {"stdp": ("w", "x_pre", "x_post"), "bcm": ("w", "theta"), "competition": ("y'", "win"),
              "normalize": ("w",), "sequence": ("y'", "win", *STATE), "fused": STATE}


def make_op(op: str, be: str, compiled=None):
    """``f(I) -> the tensors named in GATE_NAMES[op]`` (``I`` is updated in place)."""
    def call(I):
        if op == "stdp":
            _stdp(I, be)
        elif op == "bcm":
            _bcm(I, I["yp"], I["win"], be)
        elif op == "competition":
            return _competition(I["y"], be)
        elif op == "normalize":
            ck.ops.heterosynaptic_normalize_(I["w"], I["target"], where=I["where"], stencil=STENCIL,
                                             boundary=BOUNDARY, backend=be)
        elif op == "sequence":
            return (*_sequence(I, be), *(I[k] for k in STATE))
        else:
            fused = compiled or (lambda *t: _fused(*t, be=be))
            fused(I["w"], I["y"], I["x_pre"], I["x_post"], I["theta"])
        return tuple(I[k] for k in GATE_NAMES[op])

    return call


def bytes_moved(op: str, n: int, b: int, e: int) -> int:
    """Minimum bytes of one call (see the module docstring)."""
    if op in ("fused", "sequence"):
        return e * (2 * K * n + 5 * b * n + 2 * n)
    if op == "stdp":
        return e * (2 * K * n + 5 * b * n) + b * n
    if op == "bcm":
        return e * (2 * K * n + b * n + 2 * n) + b * n
    if op == "competition":
        return e * 2 * b * n + b * n
    return e * 2 * K * n + 4 * n + n  # normalize


def _new_row(backend, op, dims, b) -> dict:
    return {"size": list(dims), "N": dims[0] * dims[1] * dims[2], "B": b, "K": K, "op": op, "backend": backend,
            "status": None, "error": None, "max_abs_err": None, "gate_size": None, "compile_s": None,
            "peak_mib": None, "median_ms": None, "runs": None, "number_per_run": None, "iqr_ms": None}


def time_row(row, call, I, args, device, esize, est=None) -> dict:
    """Size the measurement with one call (unless ``est`` seconds is known; on CUDA
    also the peak memory), then time ``call(I)``."""
    if est is None:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        _, est = H.call_once(lambda: call(I), device)
        if device.type == "cuda":
            row["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    row.update(H.measure(lambda: call(I), device, H.min_run_time_for(est, args.min_run_time, 3, args.max_row_time)))
    t = row["median_ms"] * 1e-3
    row["synapse_updates_per_s"] = K * row["N"] / t
    row["bytes_min"] = bytes_moved(row["op"], row["N"], row["B"], esize)
    row["gbps"] = row["bytes_min"] / t / 1e9
    return row


def run_config(dims, b, args, device, notes) -> list:
    """Gate, then time, every (backend, op) of one lattice and batch."""
    n = dims[0] * dims[1] * dims[2]
    ref_runs = b * K * n <= args.reference_limit
    I = make_inputs(dims, b, args.dtype, device, args.seed, "reference" if ref_runs else None)
    G = I if ref_runs else make_inputs(GATE_DIMS, b, args.dtype, device, args.seed)
    gate_size = list(dims if ref_runs else GATE_DIMS)
    if not ref_runs:
        notes.append(f"{'x'.join(map(str, dims))} B={b}: B·K·N = {b * K * n:.3g} > --reference-limit "
                     f"{args.reference_limit:.3g}: reference/compile skipped, gate on {'x'.join(map(str, GATE_DIMS))}")
    ops = [o for o in OPS if o in args.ops]
    ref, ref_est = {}, {}  # the gate values; their wall time sizes the reference's measurement
    for op in ops:
        ref[op], ref_est[op] = H.call_once(lambda: make_op(op, "reference")(clone(G)), device)
    torch._dynamo.reset()  # a fresh compile per configuration (static shapes)
    rows = []
    for name in args.backends:
        work = clone(I)
        for op in ops if name != "compile" else [o for o in ops if o == "fused"]:
            row = _new_row(name, op, dims, b)
            rows.append(row)
            print(f"  {'x'.join(map(str, dims))} B={b} {op} {name} ...", end="", flush=True)
            if name in ("reference", "compile") and not ref_runs:
                row["status"] = "skipped"
                print(" skipped", flush=True)
                continue
            try:
                compiled = None
                if name == "compile":
                    compiled = torch.compile(_fused, dynamic=False)
                    _, row["compile_s"] = H.call_once(lambda: make_op(op, name, compiled)(clone(G)), device)
                call = make_op(op, name, compiled)
                if name == "reference":
                    row["status"], row["max_abs_err"] = "ref", {k: 0.0 for k in GATE_NAMES[op]}
                else:
                    got = call(clone(G))
                    ok, row["max_abs_err"] = H.gate(got, ref[op], args.dtype, names=GATE_NAMES[op])
                    if not ok and "win" in GATE_NAMES[op]:
                        ok, row["near_tie_flips"] = near_tie_gate(got, ref[op], GATE_NAMES[op], args.dtype)
                    row["status"], row["gate_size"] = ("ok" if ok else "FAIL"), gate_size
                time_row(row, call, work, args, device, torch.finfo(args.dtype).bits // 8,
                         ref_est[op] if name == "reference" and device.type == "cpu" else None)
            except Exception as exc:  # noqa: BLE001 - a broken backend is a row of the report, not the end of it
                row["status"], row["error"] = "ERROR", f"{type(exc).__name__}: {exc}"[:4000]
            print(f" {row['status']}" + (f" {row['median_ms']:.3f} ms" if row["median_ms"] else ""), flush=True)
        del work
    share = {"win_share": float(I["win"].float().mean()), "where_share": float(I["where"].float().mean())}
    return [{**r, **share} for r in rows]


def add_fused_speedup(rows: list) -> None:
    """``fused_vs_sequence`` of each fused row: its backend's sequence median over its own."""
    seq = {(tuple(r["size"]), r["B"], r["backend"]): r["median_ms"] for r in rows
           if r["op"] == "sequence" and r["status"] in ("ref", "ok") and r["median_ms"]}
    for r in rows:
        s = seq.get((tuple(r["size"]), r["B"], r["backend"]))
        ok = r["op"] == "fused" and r["status"] in ("ref", "ok") and r["median_ms"]
        r["fused_vs_sequence"] = s / r["median_ms"] if (s and ok) else None


def table(rows: list, roof_gbps: float) -> tuple:
    cols = [("size DxHxW", "<"), ("B", ">"), ("op", "<"), ("backend", "<"), ("check", "<"), ("median ms", ">"),
            ("runs", ">"), ("syn-upd/s", ">"), ("GB/s", ">"), ("roof", ">"), ("vs eager", ">"),
            ("vs compile", ">"), ("fused/seq", ">")]
    lines, seps, notes, prev = [], [], [], None
    for r in rows:
        cfg = (tuple(r["size"]), r["B"])
        if cfg != prev:
            seps.append(len(lines))
            prev = cfg
        check = r["status"]
        if r["error"]:
            notes.append(r["error"].splitlines()[0][:160])
            check = f"{check} [{len(notes)}]"
        timed = r["median_ms"] is not None and r["status"] not in ("ERROR", "skipped")
        lines.append([
            "x".join(map(str, r["size"])), str(r["B"]), r["op"], r["backend"], check,
            H.fmt_ms(r["median_ms"]) if timed else "-",
            str(r["runs"]) if timed and r["runs"] is not None else "-",
            H.si(r.get("synapse_updates_per_s")) if timed else "-",
            f"{r['gbps']:.3g}" if timed else "-",
            f"{100 * r['gbps'] / roof_gbps:.2g}%" if timed and roof_gbps else "-",
            H.fmt_ratio(r.get("speedup_eager")), H.fmt_ratio(r.get("speedup_compile")),
            H.fmt_ratio(r.get("fused_vs_sequence")),
        ])
    return H.format_table(cols, lines, seps), notes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.plasticity",
        description="Time the plasticity ops (stdp_, bcm_, competition, normalisation, their sequence and the "
                    "fused plasticity_step_) on every backend, each checked against the eager reference first.")
    p.add_argument("--sizes", nargs="+", default=None, metavar="D,H,W",
                   help="lattice dims (D, H, W) in SPEC §1 order. Default: " + " ".join(DEFAULT_SIZES)
                        + " (--quick: " + " ".join(QUICK_SIZES) + ")")
    p.add_argument("--batch", nargs="+", default=None, metavar="B",
                   help="batch sizes. Default: " + " ".join(DEFAULT_BATCH)
                        + " (--quick: " + " ".join(QUICK_BATCH) + ")")
    p.add_argument("--backends", nargs="+", default=None, metavar="NAME",
                   help="any of reference, compile (torch.compile of the reference fused step), cpu, triton, cuda. "
                        "Default: reference, compile (not with --quick) and every available backend with "
                        "plasticity kernels that runs on the device")
    p.add_argument("--ops", nargs="+", default=None, metavar="OP", help="a subset of " + ", ".join(OPS))
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="Default: cuda if available, else cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(H.DTYPES), metavar="{float32,float16,bfloat16,float64}",
                   help="dtype of w and of the state (traces, θ, y). Default: float32")
    p.add_argument("--reference-limit", type=float, default=2**27, metavar="B·K·N",
                   help="largest B·K·N at which the reference and compile run (their temporaries are B·K·N "
                        "floats each). Default: 2^27 (skips 128³ with B=16)")
    p.add_argument("--quick", action="store_true", help="smoke test: a tiny lattice, short measurements, no compile")
    p.add_argument("--no-json", action="store_true", help="do not write benchmarks/results/*.json")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="seconds per measurement. Default: 0.5 on CPU, 0.2 on CUDA, 0.02 with --quick")
    p.add_argument("--max-row-time", type=float, default=None,
                   help="seconds a slow row may take before it gets fewer than 3 runs. Default: 20 (--quick: 2)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads. Default: torch's own choice")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs. Default: 0")
    return p


def resolve(args, parser) -> dict:
    """Fill the defaults; returns ``{backend: why it is left out}``."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    device = torch.device(args.device)
    try:
        args.sizes = [parse_size(t) for t in _split_sizes(args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES))]
        args.batch = [int(t) for t in _split_words(args.batch or (QUICK_BATCH if args.quick else DEFAULT_BATCH))]
    except (argparse.ArgumentTypeError, ValueError) as exc:
        parser.error(str(exc))
    if min(args.batch) < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--batch and --threads must be at least 1")
    args.ops = _split_words(args.ops) or list(OPS)
    if any(o not in OPS for o in args.ops):
        parser.error(f"--ops: known ops are {', '.join(OPS)}, got {' '.join(args.ops)}")
    if args.min_run_time is None:
        args.min_run_time = 0.02 if args.quick else (0.2 if device.type == "cuda" else 0.5)
    if args.max_row_time is None:
        args.max_row_time = 2.0 if args.quick else 20.0
    fast, missing = plasticity_backends(device)
    names = _split_words(args.backends) or ["reference", *([] if args.quick else ["compile"]), *fast]
    for name in names:
        if name not in ("reference", "compile", *fast):
            reason = missing.get(name) or ck.backend_status().get(name, f"unknown backend {name!r}")
            parser.error(f"--backends: {name!r} cannot be benchmarked on {device.type}: {reason}")
    args.backends = list(dict.fromkeys(names))
    args.dtype = H.DTYPES[args.dtype]
    left_out = dict(missing)
    if "compile" not in args.backends:
        left_out["compile"] = "--quick (compiling takes about a minute)" if args.quick else "not asked for"
    return left_out


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        status = ck.backend_status()
        left_out = resolve(args, parser)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = H.describe_machine(device)
    print(f"cellkern {ck.__version__} · plasticity: {STENCIL}, boundary {BOUNDARY}, {RULE}, "
          f"{str(args.dtype).replace('torch.', '')}")
    print("backends " + "; ".join(f"{n}: {v}" for n, v in status.items()))
    print("timed    " + ", ".join(args.backends) + "".join(f"; {n} left out: {v}" for n, v in left_out.items()))
    if H.machine_busy(info):
        print(f"WARNING  load average {info['load_average_1min']} on {info['cpu_cores']} cores: "
              "other work shares the CPUs, timings are unreliable")
    roof = H.copy_roof(device, min_run_time=max(0.2, min(1.0, args.min_run_time * 2)))
    print(H.format_machine(info, roof), flush=True)

    rows, skip_notes = [], []
    for dims in args.sizes:
        for b in args.batch:
            rows += run_config(dims, b, args, device, skip_notes)
    H.add_speedups(rows, key=lambda r: (tuple(r["size"]), r["B"], r["op"]))
    add_fused_speedup(rows)
    if hasattr(os, "getloadavg"):
        info["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    text, notes = table(rows, roof["gbps"])
    print()
    print(text)
    for i, note in enumerate(notes, 1):
        print(f"[{i}] {note}")
    for note in skip_notes:
        print(f"note: {note}")
    accepted = acceptance(rows, roof["gbps"], args.dtype)
    if accepted:
        print(H.format_acceptance(accepted))
    end = info.get("load_average_1min_end")
    own = torch.get_num_threads() if device.type == "cpu" else 1
    if end is not None and H.machine_busy({**info, "load_average_1min": end}, own_threads=own):
        print(f"WARNING  load average {end} on {info['cpu_cores']} cores at the end: other work shared the CPUs")

    if not args.no_json:
        payload = {
            "suite": SUITE, "machine": info, "roof": roof,
            "settings": {"stencil": STENCIL, "boundary": list(BOUNDARY), "rule": repr(RULE),
                         "dtype": str(args.dtype).replace("torch.", ""), "sizes": [list(d) for d in args.sizes],
                         "batch": args.batch, "backends": args.backends, "left_out": left_out, "ops": args.ops,
                         "reference_limit": args.reference_limit, "gate_dims": list(GATE_DIMS),
                         "min_run_time": args.min_run_time, "max_row_time": args.max_row_time, "seed": args.seed,
                         "quick": args.quick, "tolerance": dict(zip(("rtol", "atol"), H.GATE_TOLERANCE[args.dtype]))},
            "backend_status": status, "notes": skip_notes, "rows": rows, "acceptance": accepted,
        }
        labels = list(dict.fromkeys(f"{'x'.join(map(str, r['size']))} B={r['B']} {r['op']}" for r in rows))
        value = {(f"{'x'.join(map(str, r['size']))} B={r['B']} {r['op']}", r["backend"]): r.get("synapse_updates_per_s")
                 for r in rows if r["status"] in ("ref", "ok")}
        series = {name: [value.get((lab, name)) for lab in labels] for name in args.backends}
        H.save_results(SUITE, payload, info, series, labels, "plasticity", "synapse-updates/s (K·N per call)")
    return H.exit_code(rows)


if __name__ == "__main__":
    sys.exit(main())
