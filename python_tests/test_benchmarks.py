"""Smoke test of the benchmark harness: ``python -m benchmarks.propagate --quick``
runs, gates every backend against the reference and prints one table row per
backend and pass."""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch

import cellkern as ck

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of the checkout, not an installed package
    sys.path.insert(0, str(ROOT))


def _expected_backends():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        names = ck.available_backends()
    # the CPU run times only backends that run natively on CPU tensors
    return ["reference", "compile"] + [n for n in names if n in ("cpu",)]


def test_propagate_quick_prints_every_backend():
    env = dict(os.environ)
    env.pop("CELLKERN_BACKEND", None)
    env.pop("TRITON_INTERPRET", None)  # interpreted Triton is never benchmarked
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.propagate", "--quick", "--no-json", "--device", "cpu"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    assert "roof" in out and "GB/s" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("size DxHxW"))
    body = [line.split() for line in lines[header + 2:] if line and not line.startswith("-")]
    rows = {(cells[2], cells[3]): cells[4] for cells in body if len(cells) > 4}
    for backend in _expected_backends():
        for pass_ in ("fwd", "fwd+bwd"):
            assert (pass_, backend) in rows, f"no {pass_} row for {backend}:\n{out}"
            if backend != "compile":  # a failing torch.compile is reported, not an error of cellkern
                assert rows[(pass_, backend)] in ("ok", "ref"), f"{backend} {pass_}: {rows[(pass_, backend)]}\n{out}"


def test_bc_split_and_sizes():
    from benchmarks.propagate import bytes_moved, parse_size, split_bc

    assert split_bc("16") == (4, 4)
    assert split_bc("1") == (1, 1)
    assert split_bc("8") == (4, 2)
    assert split_bc("2x8") == (2, 8)
    assert parse_size("48,48,36") == (48, 48, 36)
    # fwd: read s + read w + write s'; fwd+bwd adds read g, s, w and write ds, dw
    n, b, c, k = 10, 2, 3, 26
    assert bytes_moved("fwd", n, b, c, k, 4) == 4 * (2 * n * b * c + k * n)
    assert bytes_moved("fwd+bwd", n, b, c, k, 4) == 4 * (5 * n * b * c + 3 * k * n)


def test_plasticity_benchmark_quick():
    """``python -m benchmarks.plasticity --quick`` gates and times every op on the
    reference and on each backend with plasticity kernels, and reports the
    fused-over-sequence speed-up."""
    from benchmarks.plasticity import OPS, bytes_moved

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        names = ck.available_backends()
    expected = ["reference"]
    if "cpu" in names:
        import cellkern.backends.cpu as cpu

        if hasattr(cpu, "plasticity_"):
            expected.append("cpu")
    env = dict(os.environ)
    env.pop("CELLKERN_BACKEND", None)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.plasticity", "--quick", "--no-json", "--device", "cpu"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    assert "roof" in out and "GB/s" in out and "fused/seq" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("size DxHxW"))
    body = [line.split() for line in lines[header + 2:] if line and not line.startswith("-")]
    rows = {(cells[2], cells[3]): cells for cells in body if len(cells) > 12}
    for backend in expected:
        for op in OPS:
            assert (op, backend) in rows, f"no {op} row for {backend}:\n{out}"
            assert rows[(op, backend)][4] in ("ok", "ref"), f"{backend} {op}: {rows[(op, backend)][4]}\n{out}"
        assert rows[("fused", backend)][12].endswith("x"), f"no fused/seq speed-up for {backend}\n{out}"
    # fused: w read + write, y, both traces read + write, θ read + write
    n, b, k = 10, 3, 26
    assert bytes_moved("fused", n, b, 4) == 4 * (2 * k * n + 5 * b * n + 2 * n)
    assert bytes_moved("sequence", n, b, 4) == bytes_moved("fused", n, b, 4)


def test_plasticity_winner_gate_forgives_only_near_ties():
    from benchmarks.plasticity import RULE, STENCIL, BOUNDARY, near_tie_gate, neighbourhood_gap

    g = torch.Generator().manual_seed(0)
    y = torch.rand(2, 7, 6, 5, generator=g) * 0.05
    kw = dict(stencil=STENCIL, boundary=BOUNDARY)
    yp = ck.ops.lateral_inhibition(y, beta=0.5, **kw)
    win = ck.ops.local_winners(yp, RULE.activity_threshold, **kw)
    assert torch.equal(win, (yp.double() > RULE.activity_threshold) & (neighbourhood_gap(yp) >= 0))
    names = ("y'", "win")
    b, z, r, x = torch.nonzero(win)[0].tolist()
    flipped = win.clone()
    flipped[b, z, r, x] = False
    assert near_tie_gate((yp, flipped), (yp, win), names, torch.float32) == (False, 1)
    tied = yp.clone()
    tied[b, z, r, (x + 1) % 5] = tied[b, z, r, x]  # a neighbour equal to the winner
    win_t = ck.ops.local_winners(tied, RULE.activity_threshold, **kw)
    flipped_t = win_t.clone()
    flipped_t[b, z, r, x] = ~flipped_t[b, z, r, x]
    assert near_tie_gate((tied, flipped_t), (tied, win_t), names, torch.float32) == (True, 1)
