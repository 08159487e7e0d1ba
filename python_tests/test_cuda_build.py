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
import sys
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


def _setup_namespace():
    """Every function of setup.py, without running setup() (it builds on import)."""
    import ast
    import platform
    import tempfile

    path = os.path.join(ROOT, "setup.py")
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    keep = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
    ns = {"os": os, "glob": glob, "shutil": shutil, "platform": platform, "subprocess": subprocess, "sys": sys,
          "tempfile": tempfile, "CSRC": CSRC, "ROOT": ROOT}
    exec(compile(ast.Module(body=keep, type_ignores=[]), path, "exec"), ns)  # noqa: S102 - our own setup.py
    return ns


def _setup_functions(*names):
    ns = _setup_namespace()
    return [ns[n] for n in names]


def test_arch_list_reaches_nvcc():
    (arch,) = _setup_functions("cuda_arch_flags")
    assert arch("9.0") == ["-gencode=arch=compute_90,code=sm_90"]
    assert arch("8.0;9.0+PTX") == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                                   "-gencode=arch=compute_90,code=compute_90"]
    assert arch("8.6 9.0a") == ["-gencode=arch=compute_86,code=sm_86", "-gencode=arch=compute_90a,code=sm_90a"]
    assert arch("") == arch("8.0;9.0+PTX")  # the default: sm_80, sm_90 and PTX for newer GPUs
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST"):
        arch("Hopper")


def test_cellkern_cuda_switch(monkeypatch):
    """CELLKERN_CUDA=0 skips the CUDA kernels, =1 forces them (an error without
    nvcc); unset, they follow torch's CUDA and nvcc."""
    (want,) = _setup_functions("_want_cuda")
    monkeypatch.delenv("CELLKERN_BUILD_ONLY", raising=False)
    cuda_torch = type("T", (), {"version": type("V", (), {"cuda": "13.0"})})
    cpu_torch = type("T", (), {"version": type("V", (), {"cuda": None})})
    monkeypatch.delenv("CELLKERN_CUDA", raising=False)
    assert want(cuda_torch, "/x/nvcc") and not want(cpu_torch, "/x/nvcc") and not want(cuda_torch, None)
    monkeypatch.setenv("CELLKERN_CUDA", "0")
    assert not want(cuda_torch, "/x/nvcc")
    monkeypatch.setenv("CELLKERN_CUDA", "1")
    assert want(cpu_torch, "/x/nvcc")
    with pytest.raises(RuntimeError, match="CELLKERN_CUDA=1 but nvcc was not found"):
        want(cuda_torch, None)


def test_build_only_cuda_leaves_the_cpu_extension_out(monkeypatch):
    """CELLKERN_BUILD_ONLY=cuda: the extension list setup.py would build holds
    cellkern._C_cuda alone (forced as by CELLKERN_CUDA=1), for the quick GPU
    check; unset, cellkern._C is built (here alone: CELLKERN_CUDA=0)."""
    ns = _setup_namespace()
    for k, v in {"MAX_JOBS": "1", "CELLKERN_NATIVE": "0", "CELLKERN_CUDA": "0"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("CELLKERN_BUILD_ONLY", raising=False)

    def names():
        return [e.name for e in ns["extensions"]()]

    assert names() == ["cellkern._C"]
    monkeypatch.setenv("CELLKERN_BUILD_ONLY", "cpu")
    with pytest.raises(ValueError, match="CELLKERN_BUILD_ONLY must be unset or 'cuda', got 'cpu'"):
        names()
    monkeypatch.setenv("CELLKERN_BUILD_ONLY", "cuda")
    with pytest.raises(ValueError, match="contradicts CELLKERN_CUDA=0"):
        names()
    monkeypatch.delenv("CELLKERN_CUDA")
    from torch.utils.cpp_extension import CUDA_HOME

    if ns["_nvcc"](CUDA_HOME) is None:
        with pytest.raises(RuntimeError, match="nvcc was not found"):
            names()
        return
    (ext,) = ns["extensions"]()
    assert ext.name == "cellkern._C_cuda"
    assert [os.path.basename(p) for p in ext.cu_sources] == [os.path.basename(p) for p in CU_FILES]


def test_gpu_check_refuses_an_unknown_build_mode(tmp_path):
    """tools/gpu_check.sh takes GPU_CHECK_BUILD = 0, 1 or cuda (CELLKERN_BUILD_ONLY=cuda
    above) and says so, before it touches a device or a build."""
    env = dict(os.environ, GPU_CHECK_BUILD="cpu", PY="false")
    res = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_check.sh"), str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "GPU_CHECK_BUILD must be 0, 1 or cuda, got 'cpu'" in res.stdout
