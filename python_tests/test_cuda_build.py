"""The CUDA sources build without a GPU: every ``.cu`` file under csrc/cuda
compiles with ``nvcc -c`` for sm_80 and sm_90 with every warning an error,
and the torch glue compiles against the installed torch (the CPU build will
do: it needs no CUDA headers). Skipped only where nvcc is absent.

The kernels' results are checked on the CPU by test_cuda_emulation.py, on a
GPU by the test matrix (``make gpu-check``)."""
import glob
import os
import shutil
import subprocess
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
CU_FILES = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
ARCHS = ("80", "90")


def _nvcc():
    for home in filter(None, (os.environ.get("CUDA_HOME"), "/usr/local/cuda")):
        path = os.path.join(home, "bin", "nvcc")
        if os.path.exists(path):
            return path
    return shutil.which("nvcc")


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def _nvcc_cmd(src, out):
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    return [NVCC, "-c", src, "-o", out, "-O3", "-std=c++17", "-Xcompiler", "-fPIC", f"-I{CSRC}",
            "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Werror", *gencode]


def _glue_cmd():
    from torch.utils.cpp_extension import include_paths

    cxx = os.environ.get("CXX", "c++")
    inc = [f"-I{p}" for p in include_paths() + [sysconfig.get_paths()["include"], CSRC]]
    return [cxx, "-fsyntax-only", "-std=c++20", "-DTORCH_EXTENSION_NAME=_C_cuda", *inc,
            os.path.join(CSRC, "cuda", "bindings.cpp")]


def test_kernels_and_glue_stay_apart():
    """Kernel files hold CUDA only (no torch headers); the glue includes no CUDA
    headers, so it compiles against any torch."""
    names = {os.path.basename(p) for p in CU_FILES}
    assert {"propagate.cu", "plasticity.cu"} <= names, names
    kernel_side = CU_FILES + glob.glob(os.path.join(CSRC, "cuda", "*.cuh")) + [os.path.join(CSRC, "cuda", "kernels.h")]
    for path in kernel_side:
        with open(path) as f:
            text = f.read()
        for lib in ("torch", "ATen", "c10"):
            assert f"#include <{lib}" not in text, (path, lib)
    for path in glob.glob(os.path.join(CSRC, "cuda", "*.cpp")):
        with open(path) as f:
            text = f.read()
        assert "#include <cuda" not in text and "cuda_runtime" not in text, path


@needs_nvcc
def test_every_cu_file_compiles_without_warnings(tmp_path):
    """All compiles run side by side (nvcc per file, the glue with the host compiler)."""
    procs = {}
    for src in CU_FILES:
        out = tmp_path / (os.path.basename(src) + ".o")
        procs[os.path.basename(src)] = subprocess.Popen(_nvcc_cmd(src, str(out)), stdout=subprocess.PIPE,
                                                        stderr=subprocess.STDOUT, text=True)
    procs["bindings.cpp (glue)"] = subprocess.Popen(_glue_cmd(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                    text=True)
    failures = []
    for name, proc in procs.items():
        log, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            failures.append(f"--- {name} (exit {proc.returncode})\n{log[-4000:]}")
    assert not failures, "\n".join(failures)
    for src in CU_FILES:
        assert (tmp_path / (os.path.basename(src) + ".o")).stat().st_size > 0
