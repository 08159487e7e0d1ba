"""The extension build only (metadata lives in pyproject.toml).

Builds ``cellkern._C`` against the installed torch::

    pip install --no-build-isolation -e .

C++ (``csrc/*.cpp``, ``csrc/cpu/*.cpp``) always; the CUDA kernels
(``csrc/cuda/*.cu``, module ``cellkern._C_cuda``) only when torch was built
with CUDA and nvcc exists, or when forced. The ``.cu`` files hold CUDA only
and are compiled here with nvcc (``-gencode`` per architecture); their torch
glue (``csrc/cuda/*.cpp``, no CUDA headers) is a plain C++ extension that
links those objects and libcudart, so the build needs no CUDA build of torch.

Environment switches:
    CELLKERN_CUDA=1/0       force (error without nvcc) / skip the CUDA kernels
                            (default: when torch.version.cuda is set and nvcc is found)
    TORCH_CUDA_ARCH_LIST    architectures, e.g. "8.0;9.0" or "9.0+PTX" (default: sm_80, sm_90 + PTX)
    CELLKERN_BUILD_ONLY=cuda  build cellkern._C_cuda alone (forces the CUDA kernels; the
                            quick GPU check: ``tools/gpu_check.sh`` with GPU_CHECK_BUILD=cuda)
    CELLKERN_MARCH=<arch>   compile the C++ kernels with -march=<arch> (default: native), e.g.
                            x86-64-v3 (AVX2 + FMA: measures the AVX2 paths on an AVX-512
                            machine), x86-64-v4 (AVX-512), armv8.2-a; "none": no -march flag
                            (the compiler's baseline: a binary that moves between machines).
                            cellkern._C.MARCH / VECTOR_ISA / ISA_MACROS record the result
                            (``python -m cellkern.info`` prints them)
    CELLKERN_NATIVE=0       the same as CELLKERN_MARCH=none
    MAX_JOBS                parallel compile jobs (default: from free memory and cores)

The nvcc compiles start first and run beside the C++ compiles of both
extensions (they are waited for only at the link of ``_C_cuda``). A rebuild
recompiles only what changed (ninja for the C++ files, a timestamp check
against the ``.cu`` file and every csrc header for the objects) and relinks.
"""
import glob
import os
import platform
import shutil
import subprocess
import sys
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


def _march() -> str:
    """The -march the C++ kernels are built for: CELLKERN_MARCH (default
    ``native``), ``none`` for no -march flag (also CELLKERN_NATIVE=0)."""
    march = os.environ.get("CELLKERN_MARCH", "").strip() or "native"
    if _flag("CELLKERN_NATIVE") is False:
        if os.environ.get("CELLKERN_MARCH", "").strip() not in ("", "none"):
            raise ValueError(f"CELLKERN_NATIVE=0 contradicts CELLKERN_MARCH={march}")
        march = "none"
    if march != "none" and not all(c.isalnum() or c in "-_.+" for c in march):
        raise ValueError(f"CELLKERN_MARCH must be an architecture name such as native or x86-64-v3, got {march!r}")
    return march


def _native_flags() -> list:
    """``-march=<CELLKERN_MARCH>`` and the define that records it in cellkern._C.MARCH.
    An explicit CELLKERN_MARCH the compiler rejects is an error; the default
    ``native`` is dropped silently where the compiler or machine lacks it."""
    march = _march()
    record = [f"-DCELLKERN_MARCH={march}"]  # a bare token (no shell quoting): csrc/cellkern.cpp stringifies it
    if march == "none":
        return record
    if march == "native":
        if platform.machine().lower() not in ("x86_64", "amd64", "aarch64", "arm64") or \
                not _compiler_accepts("-march=native"):
            return ["-DCELLKERN_MARCH=none"]
        return ["-march=native"] + record
    if not _compiler_accepts(f"-march={march}"):
        raise ValueError(f"CELLKERN_MARCH={march}: the compiler rejects -march={march}")
    return [f"-march={march}"] + record


def _nvcc(cuda_home):
    """The nvcc to use: $CUDA_HOME/bin/nvcc (torch's guess of CUDA_HOME), else
    the one on PATH, else /usr/local/cuda/bin/nvcc."""
    for home in filter(None, (os.environ.get("CUDA_HOME"), cuda_home)):
        path = os.path.join(home, "bin", "nvcc")
        if os.path.exists(path):
            return path
    fallback = "/usr/local/cuda/bin/nvcc"
    return shutil.which("nvcc") or (fallback if os.path.exists(fallback) else None)


def _build_only():
    """CELLKERN_BUILD_ONLY: None when unset (every extension), "cuda" for
    cellkern._C_cuda alone (the CPU extension is neither built nor touched)."""
    v = os.environ.get("CELLKERN_BUILD_ONLY", "").strip().lower()
    if v not in ("", "cuda"):
        raise ValueError(f"CELLKERN_BUILD_ONLY must be unset or 'cuda', got {v!r}")
    return v or None


def _want_cuda(torch, nvcc) -> bool:
    """CELLKERN_CUDA=1 (or CELLKERN_BUILD_ONLY=cuda) forces the CUDA kernels (an
    error without nvcc), =0 skips them; by default they are built when torch
    has CUDA and nvcc exists."""
    forced = _flag("CELLKERN_CUDA")
    if _build_only() == "cuda":
        if forced is False:
            raise ValueError("CELLKERN_BUILD_ONLY=cuda contradicts CELLKERN_CUDA=0")
        forced = True
    if forced is False or not glob.glob(os.path.join(CSRC, "cuda", "*.cu")):
        return False
    if forced is True:
        if nvcc is None:
            raise RuntimeError("CELLKERN_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
        return True
    return torch.version.cuda is not None and nvcc is not None


def cuda_arch_flags(arch_list=None) -> list:
    """nvcc ``-gencode`` flags for TORCH_CUDA_ARCH_LIST (``"8.0;9.0"``, ``"9.0+PTX"``,
    ``"9.0a"``; ``;``, ``,`` or spaces between entries). Default: sm_80 and
    sm_90 code plus compute_90 PTX (which newer GPUs compile at load time)."""
    text = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if arch_list is None else arch_list
    entries = [e for e in text.replace(",", ";").replace(" ", ";").split(";") if e.strip()]
    if not entries:
        entries = ["8.0", "9.0+PTX"]
    flags = []
    for entry in entries:
        e = entry.strip()
        ptx = e.upper().endswith("+PTX")
        e = e[:-4] if ptx else e
        num = e.replace(".", "")
        if not num[:2].isdigit():
            raise ValueError(f"TORCH_CUDA_ARCH_LIST: cannot read the architecture {entry!r}")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def nvcc_flags() -> list:
    """The flags every ``.cu`` file is compiled with (also by python_tests/test_cuda_build.py)."""
    return ["-O3", "-std=c++17", "-lineinfo", "-Xcompiler", "-fPIC", f"-I{os.path.join(ROOT, CSRC)}"]


def _headers() -> list:
    """Every header under csrc/ (a newer one recompiles the .cu objects)."""
    return sorted(glob.glob(os.path.join(ROOT, CSRC, "**", "*.h"), recursive=True) +
                  glob.glob(os.path.join(ROOT, CSRC, "**", "*.cuh"), recursive=True))


def _compile_cu(nvcc, sources, out_dir, jobs) -> list:
    """Compile each ``.cu`` file to an object (again only when it or a header
    under csrc/ is newer than its object), ``jobs`` at a time; nvcc compiles
    the architectures of one file in parallel too (--threads)."""
    from concurrent.futures import ThreadPoolExecutor

    os.makedirs(out_dir, exist_ok=True)
    newest_header = max((os.path.getmtime(h) for h in _headers()), default=0.0)
    arch = cuda_arch_flags()
    flags = nvcc_flags() + arch + ([f"--threads={min(len(arch), max(1, jobs // max(1, len(sources))))}"]
                                   if len(arch) > 1 else [])

    def one(src):
        obj = os.path.join(out_dir, os.path.basename(src) + ".o")
        stamp = obj + ".flags"
        key = " ".join([nvcc] + flags)
        fresh = (os.path.exists(obj) and os.path.getmtime(obj) >= max(os.path.getmtime(src), newest_header)
                 and os.path.exists(stamp) and open(stamp).read() == key)
        if not fresh:
            cmd = [nvcc, "-c", src, "-o", obj] + flags
            sys.stdout.write(" ".join(cmd) + "\n")  # one write: the compiles print from threads
            sys.stdout.flush()
            subprocess.run(cmd, check=True)
            with open(stamp, "w") as f:
                f.write(key)
        return obj

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, sources))


def _cudart(nvcc, cuda_home) -> tuple:
    """``(folder, library)`` of the CUDA runtime to link: libcudart.so under
    $CUDA_HOME, torch's CUDA_HOME, the toolkit of nvcc or /usr/local/cuda (lib64,
    lib or targets/<arch>/lib), else a versioned libcudart.so.N there or in the
    pip-installed NVIDIA runtime next to torch (linked by its file name)."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cuda_home,
             os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    dirs = [os.path.join(home, sub) for home in filter(None, homes)
            for sub in ("lib64", "lib", os.path.join("targets", f"{platform.machine()}-linux", "lib"))]
    try:
        import torch

        site = os.path.dirname(os.path.dirname(torch.__file__))
        dirs += sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib")))
    except ImportError:  # pragma: no cover - torch is a build requirement
        pass
    for d in dirs:
        if os.path.exists(os.path.join(d, "libcudart.so")):
            return d, "cudart"
    for d in dirs:
        versioned = sorted(glob.glob(os.path.join(d, "libcudart.so.[0-9]*")))
        if versioned:
            return d, ":" + os.path.basename(versioned[0])
    raise RuntimeError(f"libcudart.so not found in any of {dirs} (set CUDA_HOME)")


def _cuda_extension(CppExtension, nvcc, cuda_home, cxx_flags):
    """``cellkern._C_cuda``: the glue, linked with the nvcc objects and libcudart."""
    lib_dir, cudart = _cudart(nvcc, cuda_home)
    cu = sorted(os.path.join(ROOT, p) for p in glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    ext = CppExtension(
        name="cellkern._C_cuda",
        sources=sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cpp"))),
        include_dirs=[os.path.join(ROOT, CSRC)],
        extra_compile_args={"cxx": [f for f in cxx_flags if f != "-fopenmp"]},
        library_dirs=[lib_dir],
        libraries=[cudart],
        extra_link_args=[f"-Wl,-rpath,{lib_dir}"],
    )
    ext.cu_sources, ext.nvcc = cu, nvcc  # compiled by build_ext (cmdclass) before the link
    return ext


def extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension

    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))
    # No -std here: BuildExtension adds the standard this torch's headers need
    # (C++17 up to torch 2.9, C++20 after); the sources themselves are C++17.
    # -fno-wrapv undoes the -fwrapv that Python's own CFLAGS bring along: with
    # wrapping signed arithmetic GCC cannot prove index loops free of overflow
    # and can emit much slower code (a standalone 128³ moore gather loop: 14.8
    # ms with -fwrapv, 5.6 ms without). The kernels never rely on signed wrap.
    # -g0 undoes the -g of Python's CFLAGS: the debug info of the kernels'
    # template instantiations costs compile time and changes no instruction.
    cxx_flags = ["-O3", "-fno-wrapv", "-fopenmp", "-g0"] + _native_flags()
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    kwargs = dict(
        name="cellkern._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, CSRC)],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )
    exts = [] if _build_only() == "cuda" else [CppExtension(**kwargs)]
    nvcc = _nvcc(CUDA_HOME)
    if _want_cuda(torch, nvcc):
        exts.append(_cuda_extension(CppExtension, nvcc, CUDA_HOME, cxx_flags))
    return exts


def cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    base = BuildExtension.with_options(use_ninja=True)

    class BuildWithCuda(base):
        """torch's BuildExtension, with the ``.cu`` objects of an extension
        compiled by nvcc: started before any extension is built, so they run
        beside the C++ compiles, and waited for at the link that needs them."""

        def build_extensions(self):
            from concurrent.futures import ThreadPoolExecutor

            jobs = int(os.environ.get("MAX_JOBS", "1"))
            out = os.path.join(os.path.abspath(self.build_temp), "cuda-objects")
            with ThreadPoolExecutor(max_workers=1) as pool:
                self._cu_objects = {ext.name: pool.submit(_compile_cu, ext.nvcc, ext.cu_sources, out, jobs)
                                    for ext in self.extensions if getattr(ext, "cu_sources", None)}
                super().build_extensions()

        def build_extension(self, ext):
            job = getattr(self, "_cu_objects", {}).get(ext.name)
            if job is None:
                return super().build_extension(ext)
            link = self.compiler.link_shared_object

            def link_with_cu_objects(objects, *args, **kwargs):
                objs = job.result()  # raises a failed nvcc compile here
                return link(list(objects) + [o for o in objs if o not in objects], *args, **kwargs)

            self.compiler.link_shared_object = link_with_cu_objects
            try:
                super().build_extension(ext)
            finally:
                self.compiler.link_shared_object = link
            job.result()  # also when the link was skipped (up to date): an nvcc failure still fails the build

    return {"build_ext": BuildWithCuda}


setup(ext_modules=extensions(), cmdclass=cmdclass())
