"""Benchmark of the mixing form (SPEC §11, the locally connected layer), correctness-gated.

    python -m benchmarks.mixing                      # the default sweep (32³ and 64³, C 4 and 8, B 1 and 16)
    python -m benchmarks.mixing --quick --no-json
    python -m benchmarks.mixing --sizes 64,64,64 --channels 4 --batch 1 --backends cpu einsum

Three passes, Moore stencil (K = 26), periodic boundary, fp32 by default,
``s ~ U(-1, 1)`` ``[B, C, D, H, W]``, ``W ~ N(0, 1/(K·C))`` ``[K, C, C, D, H, W]``:

- ``fwd``      ``a = ck.ops.aggregate(s, W)``: ``a[b,o,i] = Σ_k Σ_c W[k,o,c,i]·s[b,c,nbr(i,k)]``;
- ``fwd+bwd``  the same with ``s`` and ``W`` requiring grad, ``torch.autograd.grad``
  with the upstream ``g = 1``: ``(a, ds, dW)``;
- ``hebb``     ``ck.ops.competitive_hebbian_step_(W, s, β, eta=0.01, tau=0.1,
  eta_beta=0.01, average="wins")``, in place on ``W`` and ``β``.

Rows: ``reference`` (the public op on the eager reference backend),
``compile`` (``torch.compile`` of that op), ``einsum`` (the layer a user
writes without cellkern: the K shifted copies of ``s`` stacked, then one
``torch.einsum``; for ``hebb`` the same copies feed the update formulas) and
every cellkern backend that runs natively on the device. A row whose
estimated peak memory exceeds ``--max-gib`` is skipped (marked ``skip``).

Correctness gate: each row's first call is compared with the reference's
(``a``; ``a, ds, dW``; ``W`` and ``β`` after one step from the same start)
within :data:`benchmarks.harness.GATE_TOLERANCE` before it is timed.

Reported per row (``t`` the median time, ``N = D·H·W``, ``e`` the element size):

- syn-upd/s   = N·K·C·C·B / t (one multiply-add per synapse channel pair and sample)
- GB/s        = minimum bytes / t, with ``Wb = e·K·C·C·N`` (the weights):
                fwd ``Wb + e·2·B·C·N``; fwd+bwd ``3·Wb + e·6·B·C·N``
                (W read twice, dW written; s, g read, a, ds written);
                hebb ``2·Wb + e·B·C·N + 8·C·N`` (W read and written once, s read, β in fp32)
- roof        = GB/s over the copy bandwidth measured in the same run
- GFLOP/s     = 2·N·K·C·C·B·m / t with m = 1 (fwd), 3 (fwd+bwd: a, ds, dW), 2 (hebb: u and Σ_b p·s)
- peak        = GFLOP/s over the fp32 ``torch.mm`` rate measured in the same run
                (square matrices of ``--mm-size``, the machine's matmul peak)
- vs eager / vs compile = the reference's (compiled reference's) median over the row's.

B = 1 is memory-bound (each weight is used once): the copy roof is its
ceiling. B = 16 reuses each weight 16 times: the matmul peak is its ceiling.
The exit status is 1 when a cellkern backend fails its gate or raises.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

import cellkern as ck

from . import harness as H
from .propagate import cellkern_backends, parse_size

SUITE = "mixing"
STENCIL, BOUNDARY = "moore", "periodic"
ETA, TAU, ETA_BETA, AVERAGE = 0.01, 0.1, 0.01, "wins"
DEFAULT_SIZES = ("32,32,32", "64,64,64")
DEFAULT_CHANNELS = (4, 8)
DEFAULT_BATCH = (1, 16)
QUICK_SIZES = ("6,5,7",)
PASSES = ("fwd", "fwd+bwd", "hebb")


def matmul_peak(device: torch.device, n: int, min_run_time: float) -> dict:
    """fp32 ``torch.mm`` of two n×n matrices: GFLOP/s = 2n³/t (the fastest of 3 medians)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    samples = [H.measure(lambda: torch.mm(a, b, out=out), device, min_run_time / 3) for _ in range(3)]
    best = min(samples, key=lambda t: t["median_ms"])
    return {"op": f"torch.mm fp32 {n}x{n}", "n": n, "gflops": 2 * n**3 / (best["median_ms"] * 1e-3) / 1e9,
            "samples_gflops": [2 * n**3 / (t["median_ms"] * 1e-3) / 1e9 for t in samples], **best}


# ---- the layer a user writes without cellkern: K shifted copies and one einsum ----

def _shifted(s, offsets):
    """``[B, K, C, D, H, W]``: copy k is ``s`` at ``i + o_k`` (periodic)."""
    return torch.stack([torch.roll(s, shifts=(-dz, -dy, -dx), dims=(2, 3, 4)) for dz, dy, dx in offsets], dim=1)


def einsum_aggregate(s, w, offsets):
    return torch.einsum("kocdhw,bkcdhw->bodhw", w, _shifted(s, offsets))


def einsum_hebbian_(w, s, beta, offsets):
    """The competitive Hebbian step (average="wins", every synapse live: periodic, no mask) as einsums."""
    with torch.no_grad():
        nb = _shifted(s, offsets)
        u = torch.einsum("kocdhw,bkcdhw->bodhw", w, nb)
        p = torch.softmax((u + beta) / TAU, dim=1)
        n = 1.0 + p.sum(0)
        hebb = torch.einsum("bodhw,bkcdhw->kocdhw", p, nb)
        w.add_(ETA / n.unsqueeze(1) * (hebb - (p * u).sum(0).unsqueeze(1) * w))
        beta.sub_(ETA_BETA * (p.mean(0) - 1.0 / w.shape[1]))


def make_op(backend: str, pass_: str, offsets):
    """``f(s, w[, beta])`` for a backend row."""
    if backend == "einsum":
        if pass_ == "hebb":
            return lambda s, w, beta: einsum_hebbian_(w, s, beta, offsets)
        return lambda s, w: einsum_aggregate(s, w, offsets)
    name = "reference" if backend == "compile" else backend
    if pass_ == "hebb":
        def op(s, w, beta):
            ck.ops.competitive_hebbian_step_(w, s, beta, eta=ETA, tau=TAU, eta_beta=ETA_BETA, average=AVERAGE,
                                             stencil=STENCIL, boundary=BOUNDARY, backend=name)
    else:
        def op(s, w):
            return ck.ops.aggregate(s, w, stencil=STENCIL, boundary=BOUNDARY, backend=name)
    return torch.compile(op, dynamic=False) if backend == "compile" else op


def make_call(op, pass_: str, s, w, beta, g):
    """A no-argument callable of one pass and what it returns for the gate."""
    if pass_ == "fwd":
        return lambda: (op(s, w),)
    if pass_ == "hebb":
        wc, bc = w.clone(), beta.clone()

        def step():
            op(s, wc, bc)
            return wc, bc

        return step
    sg = s.detach().clone().requires_grad_(True)
    wg = w.detach().clone().requires_grad_(True)

    def fwd_bwd():
        out = op(sg, wg)
        ds, dw = torch.autograd.grad(out, (sg, wg), g)
        return out, ds, dw

    return fwd_bwd


def estimate_gib(backend: str, pass_: str, n: int, b: int, c: int, k: int, esize: int) -> float:
    """A rough peak of the row's own allocations (inputs included), to skip what cannot fit."""
    wb, sb, nb = k * c * c * n * esize, b * c * n * esize, b * k * c * n * esize
    if backend == "einsum":
        est = wb + 3 * nb + 2 * wb if pass_ != "hebb" else 3 * wb + 3 * nb
        est *= 2 if pass_ == "fwd+bwd" else 1
    elif backend in ("reference", "compile"):
        est = {"fwd": wb + 4 * sb, "fwd+bwd": 4 * wb + 8 * sb, "hebb": 5 * wb + 6 * sb}[pass_]
    else:
        est = {"fwd": wb + 2 * sb, "fwd+bwd": 3 * wb + 5 * sb, "hebb": 2 * wb + 3 * sb}[pass_]
    return est / 2**30


def rates(row: dict, esize: int) -> dict:
    n, b, c, k = row["N"], row["B"], row["C"], row["K"]
    t = row["median_ms"] * 1e-3
    syn = n * k * c * c * b
    wb = esize * k * c * c * n
    row["bytes_min"] = {"fwd": wb + esize * 2 * b * c * n, "fwd+bwd": 3 * wb + esize * 6 * b * c * n,
                        "hebb": 2 * wb + esize * b * c * n + 8 * c * n}[row["pass"]]
    row["flops"] = 2 * syn * {"fwd": 1, "fwd+bwd": 3, "hebb": 2}[row["pass"]]
    row["synapse_updates_per_s"] = syn / t
    row["gbps"] = row["bytes_min"] / t / 1e9
    row["gflops"] = row["flops"] / t / 1e9
    return row


def _new_row(backend, pass_, cfg) -> dict:
    return {"size": list(cfg["dims"]), "N": cfg["N"], "B": cfg["B"], "C": cfg["C"], "K": cfg["K"], "pass": pass_,
            "backend": backend, "status": None, "error": None, "max_abs_err": None, "compile_s": None,
            "graph_breaks": None, "est_gib": None, "median_ms": None, "runs": None, "number_per_run": None,
            "iqr_ms": None}


def run_row(backend, pass_, s, w, beta, g, ref, cfg, args, device, offsets) -> tuple:
    """Gate ``backend`` against ``ref`` (None: this is the reference row, whose
    first result becomes the gate), then time it. Returns ``(row, result)``."""
    row = _new_row(backend, pass_, cfg)
    row["est_gib"] = estimate_gib(backend, pass_, cfg["N"], cfg["B"], cfg["C"], cfg["K"], s.element_size())
    if row["est_gib"] > args.max_gib:
        row["status"] = "skip"
        row["error"] = f"{backend} {pass_}: needs about {row['est_gib']:.1f} GiB (> --max-gib {args.max_gib})"
        return row, None
    got = None
    try:
        op = make_op(backend, pass_, offsets)
        call = make_call(op, pass_, s, w, beta, g)
        breaks0 = sum(torch._dynamo.utils.counters["graph_break"].values())
        got, est = H.call_once(call, device)
        got = tuple(x.detach().clone() for x in got)
        if backend == "compile":
            row["compile_s"] = est
            row["graph_breaks"] = sum(torch._dynamo.utils.counters["graph_break"].values()) - breaks0
            _, est = H.call_once(call, device)
        names = {"fwd": ("a",), "fwd+bwd": ("a", "ds", "dw"), "hebb": ("w", "beta")}[pass_]
        if ref is None:
            row["status"] = "ref"
            row["max_abs_err"] = {nm: 0.0 for nm in names}
        else:
            ok, row["max_abs_err"] = H.gate(got, ref, s.dtype, names=names)
            row["status"] = "ok" if ok else "FAIL"
        row.update(H.measure(call, device, H.min_run_time_for(est, args.min_run_time, 3, args.max_row_time)))
    except Exception as exc:  # noqa: BLE001 - a broken row is a line of the report, not the end of it
        row["status"] = "ERROR"
        row["error"] = f"{backend} {pass_}: {type(exc).__name__}: {exc}"[:4000]
        return row, got
    return rates(row, s.element_size()), got


def table(rows: list, roof_gbps: float, peak_gflops: float) -> tuple:
    cols = [("size", "<"), ("BxC", "<"), ("pass", "<"), ("backend", "<"), ("check", "<"), ("median ms", ">"),
            ("runs", ">"), ("syn-upd/s", ">"), ("GB/s", ">"), ("roof", ">"), ("GFLOP/s", ">"), ("peak", ">"),
            ("vs eager", ">"), ("vs compile", ">")]
    lines, seps, notes, prev = [], [], [], None
    for r in rows:
        cfg = (tuple(r["size"]), r["B"], r["C"])
        if cfg != prev:
            seps.append(len(lines))
            prev = cfg
        check = r["status"]
        if r["error"]:
            notes.append(r["error"].splitlines()[0][:200])
            check = f"{check} [{len(notes)}]"
        timed = r["median_ms"] is not None and r["status"] in ("ref", "ok", "FAIL")
        lines.append([
            "x".join(map(str, r["size"])), f"{r['B']}x{r['C']}", r["pass"], r["backend"], check,
            H.fmt_ms(r["median_ms"]) if timed else "-", str(r["runs"]) if timed and r["runs"] else "-",
            H.si(r.get("synapse_updates_per_s")) if timed else "-",
            f"{r['gbps']:.3g}" if timed else "-", f"{100 * r['gbps'] / roof_gbps:.2g}%" if timed else "-",
            f"{r['gflops']:.3g}" if timed else "-", f"{100 * r['gflops'] / peak_gflops:.2g}%" if timed else "-",
            H.fmt_ratio(r.get("speedup_eager")), H.fmt_ratio(r.get("speedup_compile")),
        ])
    return H.format_table(cols, lines, seps), notes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mixing",
                                description="Time the mixing form (aggregate forward, forward+backward and the "
                                            "competitive Hebbian step) on every backend, each checked against the "
                                            "eager reference first.")
    p.add_argument("--sizes", nargs="+", default=None, metavar="D,H,W",
                   help="lattice dims (D, H, W). Default: " + " ".join(DEFAULT_SIZES))
    p.add_argument("--channels", nargs="+", type=int, default=None, metavar="C",
                   help="C = C_in = C_out. Default: 4 8")
    p.add_argument("--batch", nargs="+", type=int, default=None, metavar="B", help="batch sizes. Default: 1 16")
    p.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES, help="Default: all three")
    p.add_argument("--backends", nargs="+", default=None, metavar="NAME",
                   help="any of reference, compile, einsum, cpu, triton, cuda. Default: all that run on the device")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="Default: cuda if available, else cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(H.DTYPES), help="Default: float32")
    p.add_argument("--quick", action="store_true", help="smoke test: a tiny lattice, short measurements")
    p.add_argument("--no-json", action="store_true", help="do not write benchmarks/results/*.json")
    p.add_argument("--min-run-time", type=float, default=None, help="seconds per measurement. Default: 0.5 "
                   "(CUDA 0.2, --quick 0.02)")
    p.add_argument("--max-row-time", type=float, default=None,
                   help="seconds a slow row may take before it gets fewer than 3 runs. Default: 20 (--quick: 2)")
    p.add_argument("--max-gib", type=float, default=None,
                   help="skip rows estimated to need more memory. Default: half the available memory")
    p.add_argument("--mm-size", type=int, default=2048, help="matrix size of the matmul peak. Default: 2048")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads. Default: torch's own choice")
    p.add_argument("--seed", type=int, default=0)
    return p


def _available_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) for line in f if line.split()[1:]}
        return info.get("MemAvailable", 0) / 2**20
    except (OSError, ValueError):
        return 8.0


def resolve(args, parser) -> torch.device:
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    try:
        args.sizes = [parse_size(t) for t in (args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES))]
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    args.channels = args.channels or ([3] if args.quick else list(DEFAULT_CHANNELS))
    args.batch = args.batch or ([2] if args.quick else list(DEFAULT_BATCH))
    if min(args.channels + args.batch) < 1:
        parser.error("--channels and --batch must be positive")
    if args.min_run_time is None:
        args.min_run_time = 0.02 if args.quick else (0.2 if device.type == "cuda" else 0.5)
    if args.max_row_time is None:
        args.max_row_time = 2.0 if args.quick else 20.0
    if args.max_gib is None:
        args.max_gib = (torch.cuda.mem_get_info(device)[0] / 2**30 if device.type == "cuda" else _available_gib()) / 2
    usable = ["reference", "compile", "einsum", *cellkern_backends(device)]
    names = args.backends or usable
    for name in names:
        if name not in usable:
            parser.error(f"--backends: {name!r} cannot run on {device.type} here; usable: {', '.join(usable)}")
    args.backends = list(dict.fromkeys(["reference", *names]))  # the reference is the gate
    args.dtype = H.DTYPES[args.dtype]
    return device


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = resolve(args, parser)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = H.describe_machine(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        status = ck.backend_status()
    print(f"cellkern {ck.__version__} · mixing: {STENCIL}, {BOUNDARY}, {str(args.dtype).replace('torch.', '')}; "
          f"hebb eta {ETA}, tau {TAU}, eta_beta {ETA_BETA}, average {AVERAGE}")
    print("backends " + "; ".join(f"{n}: {v}" for n, v in status.items()))
    if H.machine_busy(info):
        print(f"WARNING  load average {info['load_average_1min']} on {info['cpu_cores']} cores: "
              "other work shares the CPUs, timings are unreliable")
    roof = H.copy_roof(device, min_run_time=max(0.2, min(1.0, args.min_run_time * 2)))
    peak = matmul_peak(device, args.mm_size, max(0.3, min(1.5, args.min_run_time * 3)))
    print(H.format_machine(info, roof))
    print(f"peak     {peak['op']}: {peak['gflops']:.1f} GFLOP/s ({peak['median_ms']:.2f} ms)", flush=True)

    st = ck.stencil(STENCIL)
    offsets = [tuple(int(v) for v in o) for o in st.offsets.tolist()]
    k = st.K
    rows = []
    for dims in args.sizes:
        n = dims[0] * dims[1] * dims[2]
        for c in args.channels:
            for b in args.batch:
                cfg = {"dims": dims, "B": b, "C": c, "N": n, "K": k}
                torch.manual_seed(args.seed)
                s = (torch.rand(b, c, *dims, device=device) * 2 - 1).to(args.dtype)
                w = (torch.randn(k, c, c, *dims, device=device) / (k * c) ** 0.5).to(args.dtype)
                beta = torch.zeros(c, *dims, device=device)
                g = torch.ones(b, c, *dims, device=device, dtype=args.dtype)
                torch._dynamo.reset()  # a fresh compile per configuration (static shapes)
                for pass_ in args.passes:
                    ref = None
                    for name in args.backends:
                        print(f"  {'x'.join(map(str, dims))} {b}x{c} {pass_} {name} ...", end="", flush=True)
                        row, got = run_row(name, pass_, s, w, beta, g, ref, cfg, args, device, offsets)
                        if name == "reference":
                            ref = got
                        del got
                        timed = row["median_ms"] is not None
                        print(f" {row['status']}" + (f" {row['median_ms']:.3f} ms" if timed else ""), flush=True)
                        rows.append(row)
                        if name == "reference" and ref is None:
                            break  # no gate: the other rows of this pass cannot be checked
                    del ref
                del s, w, beta, g
    H.add_speedups(rows, key=lambda r: (tuple(r["size"]), r["B"], r["C"], r["pass"]))
    if hasattr(os, "getloadavg"):
        info["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    text, notes = table(rows, roof["gbps"], peak["gflops"])
    print()
    print(text)
    for i, note in enumerate(notes, 1):
        print(f"[{i}] {note}")
    end = info.get("load_average_1min_end")
    own = torch.get_num_threads() if device.type == "cpu" else 1
    if end is not None and H.machine_busy({**info, "load_average_1min": end}, own_threads=own):
        print(f"WARNING  load average {end} on {info['cpu_cores']} cores at the end: other work shared the CPUs, "
              "timings are unreliable")
    if not args.no_json:
        payload = {
            "suite": SUITE, "machine": info, "roof": roof, "matmul_peak": peak,
            "settings": {"stencil": STENCIL, "boundary": BOUNDARY, "dtype": str(args.dtype).replace("torch.", ""),
                         "sizes": [list(d) for d in args.sizes], "channels": args.channels, "batch": args.batch,
                         "passes": args.passes, "backends": args.backends, "eta": ETA, "tau": TAU,
                         "eta_beta": ETA_BETA, "average": AVERAGE, "min_run_time": args.min_run_time,
                         "max_row_time": args.max_row_time, "max_gib": args.max_gib, "seed": args.seed,
                         "quick": args.quick, "tolerance": dict(zip(("rtol", "atol"), H.GATE_TOLERANCE[args.dtype]))},
            "backend_status": status,
            "rows": rows,
        }
        labels = [f"{'x'.join(map(str, r['size']))} {r['B']}x{r['C']} {r['pass']}"
                  for r in rows if r["backend"] == "reference"]
        series = {name: [next((r.get("synapse_updates_per_s") for r in rows if r["backend"] == name
                               and f"{'x'.join(map(str, r['size']))} {r['B']}x{r['C']} {r['pass']}" == lab
                               and r["status"] in ("ref", "ok")), None) for lab in labels]
                  for name in args.backends}
        H.save_results(SUITE, payload, info, series, labels, "mixing", "synapse-updates/s")
    # the baselines (compile, einsum) are not cellkern: their failures are recorded, not errors
    return int(any(r["backend"] not in ("compile", "einsum") and r["status"] in ("FAIL", "ERROR") for r in rows))


if __name__ == "__main__":
    sys.exit(main())
