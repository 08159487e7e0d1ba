"""``python -m cellkern.info``: what was built, what loaded, and why anything did not."""
from __future__ import annotations

import platform

import torch

from . import __version__
from .backends import backend_status


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
    lines.append("backends:")
    for name, state in backend_status().items():
        lines.append(f"  {name:<10} {state}")
    return "\n".join(lines)


def main() -> None:
    print(describe())


if __name__ == "__main__":
    main()
