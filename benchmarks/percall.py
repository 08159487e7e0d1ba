"""The per-call cost of the ops on a 4³ lattice (issue 19: ≤ 30 µs each).

    python -m benchmarks.percall [--threads 1]

Median µs of ``propagate``, ``activity`` and ``plasticity_step_`` on a
4 × 4 × 4 lattice (B = C = 1, moore, boundary ("zero", "periodic",
"periodic"), the full rule), beside ``torch.tanh`` of the same state (the
floor of one torch call on this machine). Every check of the ops runs; the
time is validation, dispatch and the kernel.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import cellkern as ck

from . import harness as H


def per_call_us(fn, n: int = 2000, repeats: int = 7) -> float:
    for _ in range(50):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t0) / n * 1e6)
    return sorted(samples)[len(samples) // 2]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/percall-<machine>-<date>.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    b = ("zero", "periodic", "periodic")
    s, w = torch.randn(1, 1, 4, 4, 4), torch.rand(26, 4, 4, 4) * 0.1
    y = torch.rand(1, 4, 4, 4)
    state, rule = ck.PlasticityState.create((4, 4, 4), 1), ck.PlasticityRule()
    rows = {}
    with torch.no_grad():
        rows["torch.tanh"] = per_call_us(lambda: torch.tanh(s))
        rows["propagate"] = per_call_us(lambda: ck.ops.propagate(s, w, boundary=b))
        rows["activity"] = per_call_us(lambda: ck.ops.activity(s, s))
        rows["plasticity_step_"] = per_call_us(lambda: ck.ops.plasticity_step_(w, y, state, rule, boundary=b), 500)
    info = H.describe_machine(torch.device("cpu"))
    result = dict(threads=args.threads, lattice=[4, 4, 4], median_us=rows, target_us=30.0)
    for k, v in rows.items():
        print(f"{k:<18} {v:8.1f} µs" + ("" if k == "torch.tanh" else f"  ({'≤' if v <= 30 else '>'} 30 µs)"))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(result, machine=info), f, indent=1)
        print(f"wrote {args.out}")
    else:
        print(f"wrote {H.write_json('percall', dict(result, machine=info), info)}")
    return result


if __name__ == "__main__":
    main()
