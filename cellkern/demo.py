"""A small propagation demo: a pattern on the input face spreads through a lattice.

Run by ``make demo`` / ``cellkern demo`` until the staged schedule exists. It
drives the input face (z = 0) with an embedded 8×8 glyph, runs ``steps``
fused updates with a progress bar, and prints how far activity travelled,
the time per step and the synapse-updates per second.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import backends, ops

#: an embedded 8×8 glyph (a "3"), so the demo needs no data download
GLYPH = torch.tensor([
    [0, 1, 1, 1, 1, 1, 0, 0],
    [0, 0, 0, 0, 0, 1, 1, 0],
    [0, 0, 0, 0, 0, 1, 1, 0],
    [0, 0, 1, 1, 1, 1, 0, 0],
    [0, 0, 0, 0, 0, 1, 1, 0],
    [0, 0, 0, 0, 0, 1, 1, 0],
    [0, 1, 1, 1, 1, 1, 0, 0],
    [0, 0, 0, 0, 0, 0, 0, 0],
], dtype=torch.float32)


@dataclass
class DemoResult:
    backend: str
    dims: tuple
    steps: int
    seconds: float
    layer_activity: list

    @property
    def synapse_updates_per_s(self) -> float:
        D, H, W = self.dims
        return D * H * W * 26 * self.steps / self.seconds


def run_demo(dims=(24, 32, 32), channels=4, steps=200, seed=0, backend=None, progress=True) -> DemoResult:
    """Drive the input face and propagate; returns per-layer mean activity."""
    g = torch.Generator().manual_seed(seed)
    D, H, W = dims
    boundary = ("zero", "periodic", "periodic")  # the input face does not wrap onto the output face
    w = torch.rand(26, D, H, W, generator=g) * (2.4 / 26)
    s = torch.zeros(1, channels, D, H, W)
    x = torch.zeros(1, channels, D, H, W)
    face = F.interpolate(GLYPH[None, None], size=(H, W), mode="nearest")[0, 0]
    x[:, :, 0] = 2.0 * face
    name, _ = backends.select(backend, s.device, "demo")
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in tqdm(range(steps), desc=f"propagate {D}x{H}x{W} [{name}]", disable=not progress, unit="step"):
            s = ops.propagate(s, w, x=x, leak=0.1, activation="tanh", boundary=boundary, backend=name)
    seconds = time.perf_counter() - t0
    layer = s.abs().mean(dim=(0, 1, 3, 4)).tolist()
    return DemoResult(name, dims, steps, seconds, layer)


def main(steps: int = 200) -> DemoResult:
    r = run_demo(steps=steps)
    print(f"\nbackend {r.backend}, lattice {'x'.join(map(str, r.dims))}, {r.steps} steps in {r.seconds:.2f} s "
          f"({1e3 * r.seconds / r.steps:.2f} ms/step, {r.synapse_updates_per_s / 1e6:.1f} M synapse-updates/s)")
    print("mean |state| by depth z (input face z=0 → output face):")
    peak = max(r.layer_activity) or 1.0
    for z, v in enumerate(r.layer_activity):
        print(f"  z={z:3d}  {v:8.4f}  {'#' * int(40 * v / peak)}")
    reached = sum(v > 1e-3 for v in r.layer_activity)
    print(f"activity reached {reached} of {len(r.layer_activity)} layers")
    return r


if __name__ == "__main__":
    main()
