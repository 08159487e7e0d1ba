"""The extension build only (metadata lives in pyproject.toml).

Builds ``cellkern._C`` against the installed torch::

    pip install --no-build-isolation -e .

C++ (``csrc/*.cpp``, ``csrc/cpu/*.cpp``) always; CUDA (``csrc/cuda/*``) only
when torch was built with CUDA, nvcc exists and there are CUDA sources.

Environment switches:
    CELLKERN_CUDA=1/0    force / skip the CUDA sources (default: decide from the toolkit)
    CELLKERN_NATIVE=0    do not compile with -march=native
    MAX_JOBS             parallel compile jobs (default: from free memory and cores)
"""
import glob
import os
import platform
import shutil
import subprocess
import tempfile

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")


def _flag(name: str):
    """True / False when the variable is set to 1/0 (yes/no, true/false), None when unset."""
    v = os.environ.get(name, "").strip().lower()
    if v in ("1", "yes", "true", "on"):
        return True
    if v in ("0", "no", "false", "off"):
        return False
    return None


def _default_max_jobs() -> int:
    """One job per core, at most one per ~1.5 GiB of available memory."""
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) for line in f if line.split()[1:]}
        avail_gib = info.get("MemAvailable", info.get("MemFree", 0)) / 2**20
        by_mem = max(1, int(avail_gib / 1.5))
    except (OSError, ValueError, IndexError):
        by_mem = cores
    return max(1, min(cores, by_mem))


def _compiler_accepts(flag: str) -> bool:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        res = subprocess.run([cxx, flag, "-c", src, "-o", os.path.join(tmp, "probe.o")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return res.returncode == 0


def _native_flags() -> list:
    if _flag("CELLKERN_NATIVE") is False:
        return []
    if platform.machine().lower() not in ("x86_64", "amd64", "aarch64", "arm64"):
        return []
    return ["-march=native"] if _compiler_accepts("-march=native") else []


def _cuda_sources() -> list:
    return sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")) + glob.glob(os.path.join(CSRC, "cuda", "*.cpp")))


def _want_cuda(torch, cuda_home) -> bool:
    """CUDA when torch has CUDA, nvcc exists and there are CUDA sources; CELLKERN_CUDA forces either way."""
    forced = _flag("CELLKERN_CUDA")
    if forced is False:
        return False
    has_toolkit = torch.version.cuda is not None and cuda_home is not None
    if forced is True:
        if not has_toolkit:
            raise RuntimeError(
                "CELLKERN_CUDA=1 but this torch has no CUDA "
                f"(torch.version.cuda={torch.version.cuda}) or nvcc was not found (CUDA_HOME={cuda_home})")
        return bool(_cuda_sources())
    return has_toolkit and bool(_cuda_sources())


def extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))
    # No -std here: BuildExtension adds the standard this torch's headers need
    # (C++17 up to torch 2.9, C++20 after); the sources themselves are C++17.
    # -fno-wrapv undoes the -fwrapv that Python's own CFLAGS bring along: with
    # wrapping signed arithmetic GCC cannot prove index loops free of overflow
    # and can emit much slower code (a standalone 128³ moore gather loop: 14.8
    # ms with -fwrapv, 5.6 ms without). The kernels never rely on signed wrap.
    cxx_flags = ["-O3", "-fno-wrapv", "-fopenmp"] + _native_flags()
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    kwargs = dict(
        name="cellkern._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, CSRC)],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )
    if _want_cuda(torch, CUDA_HOME):
        kwargs["sources"] = sources + _cuda_sources()
        kwargs["define_macros"] = [("CELLKERN_WITH_CUDA", None)]
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo"]
        return [CUDAExtension(**kwargs)]
    return [CppExtension(**kwargs)]


def cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(ext_modules=extensions(), cmdclass=cmdclass())
