"""The CUDA kernels' code against the reference, on the CPU.

csrc/cuda/*.cu compiled as host C++ (python_tests/cuda_emulation: the thread
indices, intrinsics and launches emulated; the glue is csrc/cuda/bindings.cpp
itself) takes the place of the ``cpu`` backend in a run of the backend test
matrices (``CELLKERN_CUDA_EMULATION=1``), so every kernel and every branch of
the glue meets the same cases as the CPU kernels before any GPU runs them.
What emulation cannot show (the barrier, shared memory, real concurrency,
speed) is left to ``make gpu-check``. Skipped where the CUDA headers are absent."""
import glob
import os
import subprocess
import sys

import pytest
import torch

from cuda_emulation import cuda_include_dir, emulated_backend

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MATRIX_FILES = ["test_propagate.py", "test_competition.py", "test_plasticity.py", "test_plasticity_rules.py",
                "test_stencil.py", "test_large_stencils.py", "test_hypothesis.py", "test_validation.py",
                "test_plasticity_validation.py"]
# the mixing form's matrices (test_mixing_cpu.py: the backend functions on every row/tile path)
MATRIX_FILES += sorted(os.path.basename(p) for p in glob.glob(os.path.join(HERE, "test_mixing*.py")))

pytestmark = [
    pytest.mark.skipif(cuda_include_dir() is None, reason="the CUDA headers (cuda_fp16.h) are absent"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the test matrix runs the real kernels"),
]


@pytest.fixture(scope="module")
def emulated():
    return emulated_backend()


def test_emulated_kernels_poison_their_outputs(emulated):
    ops = torch.ops.cellkern_cuda_emu
    emulated.set_poison(True)
    assert torch.isnan(ops.new_output([2, 3], torch.float32, torch.device("cpu"))).all()
    emulated.set_poison(False)
    try:
        assert not torch.isnan(ops.new_output([64], torch.float32, torch.device("cpu"))).all()
    finally:
        emulated.set_poison(True)


def test_the_backend_matrices_pass_on_the_emulated_kernels(emulated):
    """The suite's cpu cases, served by the emulated CUDA kernels (Triton cases deselected)."""
    env = dict(os.environ, CELLKERN_CUDA_EMULATION="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "not triton", "-p", "no:cacheprovider",
           *[os.path.join(HERE, f) for f in MATRIX_FILES]]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = (res.stdout + res.stderr)[-6000:]
    assert res.returncode == 0, tail
    assert " passed" in tail, tail
