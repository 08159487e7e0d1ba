"""Issue 18's acceptance figures that the GPU benchmarks print (share of the roof, Triton over CUDA)."""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of the checkout, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import harness as H  # noqa: E402
from benchmarks import plasticity, propagate  # noqa: E402

ROOF = 4000.0


def _row(backend, ms, gbps, status="ok", size=(128, 128, 128), b=1, c=1, pass_="fwd", op=None):
    r = {"size": list(size), "B": b, "C": c, "pass": pass_, "backend": backend, "status": status,
         "median_ms": ms, "gbps": gbps}
    if op is not None:
        r["op"] = op
    return r


def test_propagate_acceptance_judges_each_row():
    rows = [
        _row("reference", 4.0, 50.0, "ref"),
        _row("cuda", 0.10, 0.85 * ROOF), _row("triton", 0.14, 0.6 * ROOF),         # met, met (1.4x)
        _row("cuda", 0.50, 0.55 * ROOF, b=4, c=4), _row("triton", 1.0, 0.3 * ROOF, b=4, c=4),  # missed, missed
        _row("cuda", 0.40, 0.52 * ROOF, pass_="fwd+bwd"), _row("triton", 0.5, 0.1, "FAIL", pass_="fwd+bwd"),
        _row("cuda", 0.01, 0.1 * ROOF, size=(64, 64, 48)),                         # no target at 64x64x48
    ]
    got = {a["config"]: a for a in propagate.acceptance(rows, ROOF, torch.float32)}
    assert set(got) == {"128x128x128 1x1 fwd", "128x128x128 4x4 fwd", "128x128x128 1x1 fwd+bwd", "64x64x48 1x1 fwd"}
    a = got["128x128x128 1x1 fwd"]
    assert a["roof_target"] == 0.80 and a["roof_met"] and abs(a["triton_over_cuda"] - 1.4) < 1e-9 and a["ratio_met"]
    a = got["128x128x128 4x4 fwd"]
    assert a["roof_target"] == 0.60 and a["roof_met"] is False and a["ratio_met"] is False
    a = got["128x128x128 1x1 fwd+bwd"]
    assert a["roof_target"] == 0.50 and a["roof_met"], "fwd+bwd has one target for every B·C"
    assert a["triton_ms"] is None and a["ratio_met"] is False, "a row that failed its gate misses"
    a = got["64x64x48 1x1 fwd"]
    assert a["roof_target"] is None and a["roof_met"] is None and a["ratio_met"] is None
    text = H.format_acceptance(list(got.values()))
    assert "copy roof 4000 GB/s measured in this run" in text
    assert "128x128x128 1x1 fwd: cuda 0.100 ms = 85% of the roof (target >= 80% met); triton 0.140 ms = 60%, " \
           "1.40x cuda (target <= 1.5x met)" in text
    assert text.count("MISSED") == 3
    assert propagate.acceptance(rows, ROOF, torch.float16)[0]["roof_target"] is None, "targets are fp32"


def test_plasticity_acceptance_targets_the_fused_step_at_b1():
    rows = [_row("cuda", 0.5, 0.8 * ROOF, op="fused"), _row("triton", 0.9, 0.4 * ROOF, op="fused"),
            _row("cuda", 2.0, 0.5 * ROOF, op="fused", b=16), _row("cuda", 0.2, 0.5 * ROOF, op="stdp")]
    got = {a["config"]: a for a in plasticity.acceptance(rows, ROOF, torch.float32)}
    assert got["128x128x128 B=1 fused"]["roof_target"] == 0.75 and got["128x128x128 B=1 fused"]["roof_met"]
    assert got["128x128x128 B=1 fused"]["ratio_met"] is False  # 1.8x
    assert got["128x128x128 B=16 fused"]["roof_target"] is None
    assert got["128x128x128 B=1 stdp"]["roof_target"] is None and got["128x128x128 B=1 stdp"]["ratio_met"] is None
    assert H.format_acceptance([]) == ""
