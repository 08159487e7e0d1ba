"""The CUDA kernels of ``csrc/cuda`` compiled as host C++ and run on the CPU.

``emulated_backend()`` builds them (``emulation.h`` supplies thread indices,
intrinsics and the launch; ``csrc/cuda/bindings.cpp`` is the same glue, as
``torch.ops.cellkern_cuda_emu`` for CPU tensors) and returns the functions of
``cellkern/backends/cuda.py`` bound to them. With ``CELLKERN_CUDA_EMULATION=1``
conftest.py puts that module in place of the ``cpu`` backend, so the whole
test matrix runs the CUDA kernels' code on a machine without a GPU
(python_tests/test_cuda_emulation.py does so).
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
MARKER = "# ---- the backend functions"


def cuda_include_dir():
    """The CUDA toolkit's include folder (cuda_fp16.h, cuda_runtime.h), or None."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    homes += sorted(glob.glob("/usr/local/cuda-*"))
    for home in filter(None, homes):
        inc = os.path.join(home, "include")
        if os.path.exists(os.path.join(inc, "cuda_fp16.h")) and os.path.exists(os.path.join(inc, "cuda_runtime.h")):
            return inc
    return None


def build() -> None:
    """Compile and load ``torch.ops.cellkern_cuda_emu`` (cached under build/cuda-emulation)."""
    from torch.utils.cpp_extension import load

    inc = cuda_include_dir()
    if inc is None:
        raise RuntimeError("the CUDA headers (cuda_fp16.h) were not found")
    out = os.path.join(ROOT, "build", "cuda-emulation")
    os.makedirs(out, exist_ok=True)
    load(name="cellkern_cuda_emu",
         sources=[os.path.join(ROOT, "csrc", "cuda", "bindings.cpp"),
                  os.path.join(HERE, "propagate_emulated.cpp"), os.path.join(HERE, "plasticity_emulated.cpp"),
                  os.path.join(HERE, "mixing_emulated.cpp")],
         extra_include_paths=[os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "cuda"), HERE, inc],
         extra_cflags=["-O1", "-DCELLKERN_CUDA_EMULATION", "-Wno-unknown-pragmas"],
         build_directory=out, is_python_module=False, verbose=False)


def emulated_backend():
    """A module-like namespace with the backend functions of cellkern/backends/cuda.py
    running the host-compiled kernels on CPU tensors."""
    from cellkern.stencil import Geometry

    build()
    with open(os.path.join(ROOT, "cellkern", "backends", "cuda.py")) as f:
        source = f.read()
    body = source[source.index(MARKER):]
    ns = {"torch": torch, "Geometry": Geometry, "_ops": torch.ops.cellkern_cuda_emu,
          "_on": lambda t: contextlib.nullcontext(), "_stream": lambda t: 0, "__name__": "cellkern_cuda_emulated"}
    exec(compile(body, "cellkern/backends/cuda.py (emulated)", "exec"), ns)  # noqa: S102 - our own source
    mod = type(os)("cellkern_cuda_emulated")
    mod.__dict__.update({k: v for k, v in ns.items() if not k.startswith("__")})
    return mod
