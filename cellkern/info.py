"""``python -m cellkern.info``: what was built, what loaded, and why anything did not."""
from __future__ import annotations

import platform

import torch

from . import __version__
from .backends import backend_status


def build_isa():
    """What the C++ CPU extension was compiled for, or None when it is not built:
    ``{"march": "native" | "x86-64-v3" | "none" | ..., "vector_isa": "avx512" |
    "avx2-fma" | "neon" | ..., "macros": ["__AVX512F__", "__AVX2__", ...]}``
    (the compiler's predefined ISA macros, recorded at build time)."""
    try:
        from . import _C
    except ImportError:
        return None
    return {"march": getattr(_C, "MARCH", None), "vector_isa": getattr(_C, "VECTOR_ISA", None),
            "macros": list(getattr(_C, "ISA_MACROS", ()))}


def describe() -> str:
    lines = [f"cellkern {__version__}",
             f"python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}",
             f"threads: {torch.get_num_threads()}"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except Exception as exc:  # noqa: BLE001 - report, never crash
        lines.append(f"triton: not importable ({type(exc).__name__})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            lines.append(f"cuda:{i} {torch.cuda.get_device_name(i)}")
    else:
        lines.append("devices: cpu only (no CUDA device)")
    isa = build_isa()
    if isa is None:
        lines.append("cpu extension: not built")
    else:
        lines.append(f"cpu extension: -march={isa['march']}, vector ISA {isa['vector_isa']} "
                     f"({' '.join(isa['macros']) or 'no ISA macro'})")
    lines.append("backends:")
    for name, state in backend_status().items():
        lines.append(f"  {name:<10} {state}")
    return "\n".join(lines)


def main() -> None:
    print(describe())


if __name__ == "__main__":
    main()
