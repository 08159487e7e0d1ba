"""Domain-decomposed propagation across processes (gloo on CPU) against one process.

    python -m benchmarks.distributed                      # 128³, 2 processes
    python -m benchmarks.distributed --size 64,64,64 --procs 2 --steps 20

Each of ``--procs`` processes (one torch thread each, spawned here, gloo over
localhost) owns a z-slab of the lattice with halo planes (:class:`cellkern.distributed.ZSlabs`)
and runs ``--steps`` fused updates (moore, periodic, tanh, α = 0.1, B = C = 1);
before each update the halos are exchanged with one ``all_gather`` of the
boundary planes. Reported: the median step time over the ranks' steps, the share
of it spent in the halo exchange, and the same steps in one process with
``--procs`` threads (the baseline on the same cores). The distributed result is
checked against the single-process one first.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import harness as H


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(dims):
    g = torch.Generator().manual_seed(0)
    return torch.rand(1, 1, *dims, generator=g) * 2 - 1, torch.rand(26, *dims, generator=g) * 0.1


def _rank(rank, world, port, dims, steps, out):
    import cellkern as ck
    from cellkern.distributed import ZSlabs

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    s, w = _inputs(dims)
    slabs = ZSlabs(dims, "moore", "periodic", halo=1)
    w_ext = slabs.pad(slabs.local(w, 1), 1)
    s_loc = slabs.local(s, 2).contiguous()
    ref = ck.ops.propagate(s, w, leak=0.1) if rank == 0 else None
    check = slabs.gather(slabs.propagate(s_loc, w_ext, leak=0.1), 2)
    err = (check - ref).abs().max().item() if rank == 0 else 0.0
    times, halos = [], []
    for i in range(steps + 2):
        dist.barrier()
        h0, t0 = slabs.halo_seconds, time.perf_counter()
        s_loc = slabs.propagate(s_loc, w_ext, leak=0.1)
        dist.barrier()
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t0)
            halos.append(slabs.halo_seconds - h0)
    torch.save({"times": times, "halos": halos, "err": err}, f"{out}.{rank}")
    dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="128,128,128", metavar="D,H,W", help="lattice dims. Default: 128,128,128")
    p.add_argument("--procs", type=int, default=2, help="processes. Default: 2")
    p.add_argument("--steps", type=int, default=20, help="timed steps. Default: 20")
    p.add_argument("--no-json", action="store_true", help="do not write benchmarks/results/*.json")
    a = p.parse_args(argv)
    dims = tuple(int(v) for v in a.size.split(","))
    import cellkern as ck

    info = H.describe_machine(torch.device("cpu"))
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r")
        mp.spawn(_rank, args=(a.procs, _port(), dims, a.steps, out), nprocs=a.procs, join=True)
        ranks = [torch.load(f"{out}.{r}") for r in range(a.procs)]
    step = [max(r["times"][i] for r in ranks) for i in range(a.steps)]  # a step ends when the slowest rank does
    halo = [statistics.median(r["halos"]) for r in ranks]
    torch.set_num_threads(a.procs)
    s, w = _inputs(dims)
    single = []
    for i in range(a.steps + 2):
        t0 = time.perf_counter()
        s = ck.ops.propagate(s, w, leak=0.1)
        if i >= 2:
            single.append(time.perf_counter() - t0)
    t_step, t_single = statistics.median(step), statistics.median(single)
    share = statistics.median(halo) / t_step
    row = {"dims": list(dims), "procs": a.procs, "step_ms": t_step * 1e3, "halo_ms": statistics.median(halo) * 1e3,
           "halo_share": share, "single_process_ms": t_single * 1e3, "speedup_vs_single": t_single / t_step,
           "max_abs_error": ranks[0]["err"], "backend": ck.backends.select(None, torch.device("cpu"), "bench")[0]}
    cols = ["dims", "procs", "step ms", "halo ms", "halo share", f"1 proc × {a.procs} threads ms", "max |err|"]
    print(H.format_machine(info, H.copy_roof(torch.device("cpu"), min_run_time=0.2, repeats=2)))
    print(H.format_table([(c, "<" if i == 0 else ">") for i, c in enumerate(cols)],
                         [["x".join(map(str, dims)), str(a.procs), f"{t_step * 1e3:.2f}", f"{row['halo_ms']:.2f}",
                           f"{share:.1%}", f"{t_single * 1e3:.2f}", f"{row['max_abs_error']:.2g}"]]))
    if not a.no_json:
        print("wrote", H.write_json("distributed", {"rows": [row], "steps": a.steps}, info))
    return 0 if row["max_abs_error"] < 1e-5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
