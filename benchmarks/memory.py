"""Benchmark of the memory forms of the weights (SPEC §5): bytes and speed.

    python -m benchmarks.memory                      # 48,48,36 and 128,128,128
    python -m benchmarks.memory --quick --no-json
    python -m benchmarks.memory --sizes 64,64,48 --bc 1x4 --backends cpu

Four forms of the Moore weights (K = 26) of one lattice, periodic boundary,
state ``s`` fp32 ``[B, C, D, H, W]`` (default B = 1, C = 4: the 4-channel
cells of SPEC §8):

- ``dense-fp32`` (the baseline): ``w`` fp32 ``[K, D, H, W]``, every synapse live;
- ``dense-bf16``: the same in bf16 (mixed precision: fp32 state, fp32 sums);
- ``ell-fp32``: the top 30% of each cell's synapses (``prune(keep=0.3)``,
  Kmax = 8) as ``SparseWeights``: ``w_ell`` fp32 + ``idx`` uint8 ``[Kmax, D, H, W]``;
- ``ell-bf16``: the same with ``w_ell`` in bf16.

Persistent bytes: every tensor a training run keeps between steps — the
state ``s`` (B·C·N·4), the weights (K·N·e dense; Kmax·N·(e + 1) ELL), the
STDP traces (2·B·N·4) and θ (N·4) — in total and per cell. (Temporaries of
a call — the ELL kernels' interleaved state copy, the fp32 working copy of
bf16 weights in a plasticity step — are not persistent and not counted.)

Times (median, ``torch.utils.benchmark``): ``propagate`` (forward, tanh,
leak 0.1) and ``plasticity_step_`` (the default ``PlasticityRule``: STDP +
BCM + competition + normalisation; each call starts from the same traces,
copied in) of each form on each backend, and the ratio to dense-fp32 on the
same backend (> 1: faster).

Correctness gate: before it is timed, every row's output is compared with
the reference run on the dense masked form of the same weights (upcast to
fp32): ``propagate`` within the fp32 tolerance of
:data:`benchmarks.harness.GATE_TOLERANCE`, ``plasticity_step_`` within the
tolerance of the weights' dtype (the stochastic rounding of bf16 weights uses
the same seed and step in both).

Checkpointing: the peak live bytes (:class:`benchmarks.live_bytes.LiveBytes`)
of forward + backward of a T = 32 step ``propagate_steps`` unroll with
``checkpoint_every`` = none, 2, 4, 8, 16, on the first size, in states (bytes
of one ``s``): ~2T without checkpointing, ~T/k + 2k with it.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

import cellkern as ck
from cellkern import sparse as S

from . import harness as H
from .live_bytes import LiveBytes
from .propagate import cellkern_backends, parse_size, split_bc

SUITE = "memory"
STENCIL, BOUNDARY, ACTIVATION, LEAK, KEEP = "moore", "periodic", "tanh", 0.1, 0.3
DEFAULT_SIZES = ("48,48,36", "128,128,128")
QUICK_SIZES = ("6,5,7",)
FORMS = ("dense-fp32", "dense-bf16", "ell-fp32", "ell-bf16")
CKPT_STEPS, CKPT_EVERY = 32, (None, 2, 4, 8, 16)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory",
                                description="Bytes and speed of dense/ELL, fp32/bf16 weights (SPEC §5).")
    p.add_argument("--sizes", nargs="+", default=None, metavar="D,H,W",
                   help="lattice dims (D, H, W). Default: " + " ".join(DEFAULT_SIZES))
    p.add_argument("--bc", default="1x4", metavar="BxC", help="batch x channels. Default: 1x4")
    p.add_argument("--backends", nargs="+", default=None, metavar="NAME",
                   help="cellkern backends to time. Default: every available one that runs on the device")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="Default: cuda if available, else cpu")
    p.add_argument("--quick", action="store_true", help="smoke test: a tiny lattice, short measurements")
    p.add_argument("--no-json", action="store_true", help="do not write benchmarks/results/*.json")
    p.add_argument("--min-run-time", type=float, default=None, help="seconds per measurement. Default: 0.5 (--quick: 0.02)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads. Default: torch's own choice")
    p.add_argument("--seed", type=int, default=0, help="seed of the random s, w and y. Default: 0")
    return p


def make_weights(form: str, w: torch.Tensor, mask: torch.Tensor):
    """The weight argument of the ops in ``form``, and its bytes."""
    dtype = torch.bfloat16 if form.endswith("bf16") else torch.float32
    if form.startswith("dense"):
        wd = w.to(dtype)
        return wd, wd.nbytes
    sw = S.SparseWeights.from_dense(w.to(dtype), mask)
    return sw, sw.nbytes


def persistent_bytes(weight_bytes: int, B: int, C: int, N: int) -> dict:
    state, traces, theta = B * C * N * 4, 2 * B * N * 4, N * 4
    total = state + weight_bytes + traces + theta
    return {"state": state, "weights": weight_bytes, "traces": traces, "theta": theta, "total": total,
            "per_cell": total / N, "weights_per_cell": weight_bytes / N}


def dense_masked(wf):
    """fp32 dense weights and mask of a form (for the reference gate)."""
    if isinstance(wf, S.SparseWeights):
        w, m = wf.to_dense()
        return w.float(), m
    return wf.float(), None


RULE = ck.PlasticityRule()


def _propagate(s, wf, backend):
    return ck.ops.propagate(s, wf, leak=LEAK, activation=ACTIVATION, stencil=STENCIL, boundary=BOUNDARY,
                            backend=backend)


def _plasticity(wf, y, state, backend, step=None, mask=None):
    ck.ops.plasticity_step_(wf, y, state, RULE, mask, stencil=STENCIL, boundary=BOUNDARY, backend=backend, seed=1,
                            step=step)
    return wf


def _weights_of(wf):
    return wf.to_dense()[0] if isinstance(wf, S.SparseWeights) else wf


def run_form(form, w, mask, s, y, backend, args, device, cfg) -> dict:
    wf, wbytes = make_weights(form, w, mask)
    row = {"size": list(cfg["dims"]), "B": cfg["B"], "C": cfg["C"], "form": form, "backend": backend,
           "keep": 1.0 if form.startswith("dense") else KEEP,
           "Kmax": wf.Kmax if isinstance(wf, S.SparseWeights) else cfg["K"],
           "bytes": persistent_bytes(wbytes, cfg["B"], cfg["C"], cfg["N"]), "status": "ok", "error": None}
    try:
        wd, md = dense_masked(wf)
        ok_p, err_p = H.gate([_propagate(s, wf, backend)], [_propagate(s, wd.to(device), "reference")],
                             torch.float32, ["propagate"])
        st = ck.PlasticityState.create(cfg["dims"], batch=cfg["B"], device=device)
        st_ref = ck.PlasticityState.create(cfg["dims"], batch=cfg["B"], device=device)
        w_ref = _weights_of(wf).clone()
        got = _weights_of(_plasticity(make_weights(form, w, mask)[0], y, st, backend, step=0))
        want = _plasticity(w_ref, y, st_ref, "reference", step=0, mask=md)
        if md is not None:
            got, want = torch.where(md, got, 0), torch.where(md, want, 0)
        ok_q, err_q = H.gate([got], [want], got.dtype, ["plasticity"])
        row["max_abs_err"] = {**err_p, **err_q}
        if not (ok_p and ok_q):
            row["status"] = "FAIL"
        t_prop = H.measure(lambda: _propagate(s, wf, backend), device, args.min_run_time)
        st = ck.PlasticityState.create(cfg["dims"], batch=cfg["B"], device=device)
        fresh = st.x_pre.clone()

        def step():
            # the same traces every call: thousands of calls on a fixed y would decay the
            # traces of silent cells into subnormals, which slow every FP unit down
            st.x_pre.copy_(fresh)
            st.x_post.copy_(fresh)
            return _plasticity(wf, y, st, backend)

        t_plas = H.measure(step, device, args.min_run_time)
        row.update(propagate_ms=t_prop["median_ms"], propagate_runs=t_prop["runs"],
                   plasticity_ms=t_plas["median_ms"], plasticity_runs=t_plas["runs"])
    except Exception as exc:  # noqa: BLE001 - a failing row is reported, the run goes on
        row.update(status="ERROR", error=f"{type(exc).__name__}: {exc}")
    return row


def add_ratios(rows) -> None:
    """``*_vs_dense``: the dense-fp32 time over the row's (same size, backend), and the memory saving."""
    base = {(tuple(r["size"]), r["backend"]): r for r in rows if r["form"] == "dense-fp32"}
    for r in rows:
        b = base.get((tuple(r["size"]), r["backend"]))
        for key in ("propagate", "plasticity"):
            t, t0 = r.get(f"{key}_ms"), (b or {}).get(f"{key}_ms")
            r[f"{key}_vs_dense"] = t0 / t if (t and t0) else None
        r["memory_saving"] = 1 - r["bytes"]["total"] / b["bytes"]["total"] if b else None


def checkpoint_rows(dims, B, C, backend, device) -> list:
    """Peak live bytes of forward + backward of a T-step unroll per checkpoint_every."""
    torch.manual_seed(0)
    s = torch.rand(B, C, *dims, device=device) * 2 - 1
    w = torch.rand(26, *dims, device=device) * 0.05
    out = []
    for every in CKPT_EVERY:
        sg = s.clone().requires_grad_()
        with LiveBytes() as m:
            y = ck.ops.propagate_steps(sg, w, CKPT_STEPS, checkpoint_every=every, leak=LEAK, stencil=STENCIL,
                                       boundary=BOUNDARY, backend=backend)
            y.sum().backward()
            del y
        out.append({"size": list(dims), "B": B, "C": C, "backend": backend, "steps": CKPT_STEPS,
                    "checkpoint_every": every, "peak_bytes": m.peak, "peak_states": m.peak / s.nbytes})
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(args.device)
    args.sizes = [parse_size(x) for x in (args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES))]
    args.min_run_time = args.min_run_time or (0.02 if args.quick else 0.5)
    B, C = split_bc(args.bc)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    backends = args.backends or cellkern_backends(device) or ["reference"]
    info = H.describe_machine(device)
    print(f"cellkern {ck.__version__} · memory: {STENCIL}, {BOUNDARY}, keep {KEEP}, B={B}, C={C}, fp32 state")
    if H.machine_busy(info):
        print(f"WARNING  load average {info['load_average_1min']} on {info['cpu_cores']} cores: "
              "other work shares the CPUs, timings are unreliable")
    roof = H.copy_roof(device, min_run_time=0.2 if args.quick else 1.0)
    print(H.format_machine(info, roof), flush=True)
    rows = []
    for dims in args.sizes:
        N = dims[0] * dims[1] * dims[2]
        cfg = {"dims": dims, "B": B, "C": C, "N": N, "K": 26}
        g = torch.Generator(device="cpu").manual_seed(args.seed)
        w = (0.1 + 0.4 * torch.rand(26, *dims, generator=g)).to(device)
        mask = S.prune(w, keep=KEEP)
        s = (torch.rand(B, C, *dims, generator=g) * 2 - 1).to(device)
        y = torch.rand(B, *dims, generator=g).to(device)
        for backend in backends:
            for form in FORMS:
                print(f"  {'x'.join(map(str, dims))} {backend} {form} ...", end="", flush=True, file=sys.stderr)
                rows.append(run_form(form, w, mask, s, y, backend, args, device, cfg))
                print(f" {rows[-1]['status']}", file=sys.stderr)
        del w, mask, s, y
    add_ratios(rows)
    ckpt = checkpoint_rows(args.sizes[0], B, C, backends[0], device)
    if hasattr(os, "getloadavg"):
        info["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    print()
    print(format_rows(rows))
    print()
    print(H.format_table([("size", "<"), ("backend", "<"), ("T", ">"), ("checkpoint_every", ">"),
                          ("peak MiB", ">"), ("peak / state", ">")],
                         [["x".join(map(str, r["size"])), r["backend"], str(r["steps"]), str(r["checkpoint_every"]),
                           f"{r['peak_bytes'] / 2**20:.1f}", f"{r['peak_states']:.1f}"] for r in ckpt]))
    if not args.no_json:
        payload = {"suite": SUITE, "machine": info, "roof": roof,
                   "settings": {"stencil": STENCIL, "boundary": BOUNDARY, "activation": ACTIVATION, "leak": LEAK,
                                "keep": KEEP, "B": B, "C": C, "sizes": [list(d) for d in args.sizes],
                                "backends": backends, "min_run_time": args.min_run_time, "seed": args.seed,
                                "quick": args.quick},
                   "rows": rows, "checkpoint": ckpt}
        labels = [f"{'x'.join(map(str, r['size']))} {r['backend']} {r['form']}" for r in rows]
        series = {"propagate": [r.get("propagate_ms") for r in rows],
                  "plasticity_step_": [r.get("plasticity_ms") for r in rows]}
        H.save_results(SUITE, payload, info, series, labels, "memory forms: time per call", "ms")
    return int(any(r["status"] in ("FAIL", "ERROR") for r in rows))


def format_rows(rows) -> str:
    cols = [("size", "<"), ("backend", "<"), ("form", "<"), ("status", "<"), ("B/cell", ">"), ("total MiB", ">"),
            ("saving", ">"), ("propagate ms", ">"), ("vs dense", ">"), ("plasticity ms", ">"), ("vs dense", ">")]
    out = []
    for r in rows:
        sav = r.get("memory_saving")
        out.append(["x".join(map(str, r["size"])), r["backend"], r["form"], r["status"],
                    f"{r['bytes']['per_cell']:.1f}", f"{r['bytes']['total'] / 2**20:.1f}",
                    "-" if sav is None else f"{100 * sav:.0f}%",
                    H.fmt_ms(r.get("propagate_ms")), H.fmt_ratio(r.get("propagate_vs_dense")),
                    H.fmt_ms(r.get("plasticity_ms")), H.fmt_ratio(r.get("plasticity_vs_dense"))])
        if r["error"]:
            out[-1][3] += f" ({r['error'][:60]})"
    return H.format_table(cols, out)


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sys.exit(main())
