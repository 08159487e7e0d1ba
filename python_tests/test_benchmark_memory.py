"""Smoke test of ``python -m benchmarks.memory --quick``: every form passes
its gate, and the bytes it reports are the bytes of the tensors."""
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of the checkout, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import memory as M  # noqa: E402
from cellkern import sparse as S  # noqa: E402


def test_memory_quick_runs_and_gates_every_form():
    env = dict(os.environ)
    env.pop("CELLKERN_BACKEND", None)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--quick", "--no-json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for form in M.FORMS:
        assert any(form in line and " ok " in line for line in proc.stdout.splitlines()), (form, proc.stdout)
    assert "checkpoint_every" in proc.stdout


def test_memory_bytes_are_the_tensors_bytes():
    dims = (4, 5, 6)
    N = 4 * 5 * 6
    w = torch.rand(26, *dims)
    mask = S.prune(w, keep=0.3)
    dense, nb = M.make_weights("dense-fp32", w, mask)
    assert nb == 26 * N * 4
    ell, nb = M.make_weights("ell-bf16", w, mask)
    assert nb == 8 * N * (2 + 1) and ell.w_ell.dtype == torch.bfloat16
    b = M.persistent_bytes(nb, 1, 4, N)
    assert b["total"] == 4 * N * 4 + nb + 2 * N * 4 + N * 4 and b["per_cell"] == b["total"] / N
