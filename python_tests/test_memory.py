"""Memory budget (SPEC §5, §8): estimate vs measured allocation, fit_dims, validation."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cellkern as ck
from cellkern.memory import memory_breakdown, parse_bytes

ROOT = Path(__file__).resolve().parents[1]
SMALL = [d for d in ck.PROGRESSION if d[0] * d[1] * d[2] <= 48 * 48 * 36]

# Each case measures in a fresh process: the CPU kernel keeps its inhibition
# scratch per thread for good, so a case run after a larger one would not see
# it allocated. Presets run smallest first, so each one allocates its own.
MEASURE = """
import json, sys, torch
from cellkern.memory import MemoryConfig, memory_estimate
from benchmarks.memory_budget import profiler_peak, training_step
c = MemoryConfig(**eval(sys.argv[1], {"torch": torch}))
out = []
for dims in json.loads(sys.argv[2]):
    out.append([memory_estimate(tuple(dims), c), profiler_peak(training_step(tuple(dims), c, steps=2))])
print("RESULT", json.dumps(out))
"""

CASES = {
    "default": "{}",
    "B2-C4-vn-keep0.3": "dict(batch=2, channels=4, stencil='von_neumann', keep=0.3)",
    "bf16": "dict(weight_dtype=torch.bfloat16, state_dtype=torch.bfloat16, channels=4)",
    "fp16-weights-no-competition": "dict(weight_dtype=torch.float16, competition=False, drive=False)",
    "autograd-T6": "dict(autograd=True, steps=6, plasticity=False)",
    "autograd-T8-ckpt3-C2": "dict(autograd=True, steps=8, checkpoint_every=3, channels=2, plasticity=False)",
}


@pytest.mark.parametrize("case", list(CASES))
def test_estimate_within_15_percent_of_measured(case):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    env.pop("CELLKERN_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", MEASURE, CASES[case], json.dumps(SMALL)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))[7:])
    assert len(rows) == len(SMALL) == 6
    for dims, (est, measured) in zip(SMALL, rows):
        assert measured > 0
        assert abs(est / measured - 1) <= 0.15, f"{dims}: estimate {est} vs measured {measured}"


def test_profiler_peak_sees_torch_allocations():
    from benchmarks.memory_budget import profiler_peak  # noqa: E402 (benchmarks/ is on the path via ROOT)

    def fn():
        a = torch.empty(1 << 20, dtype=torch.float32)  # 4 MiB
        b = torch.empty(1 << 19, dtype=torch.float32)  # + 2 MiB at once
        del a, b
        torch.empty(1 << 20, dtype=torch.float32)      # 4 MiB again: the peak stays 6 MiB
    assert 6 << 20 <= profiler_peak(fn) < (6 << 20) + 4096


def test_fit_dims_acceptance_24gib():
    cfg = ck.MemoryConfig(stencil="moore", weight_dtype=torch.float32, state_dtype=torch.float32, batch=1,
                          channels=1, sparse_format="dense", autograd=False)
    dims = ck.fit_dims(24 * 2**30, cfg)
    assert dims == (666, 666, 333)
    assert round(dims[0] * dims[1] * dims[2] / 1e6, 1) == 147.7
    assert ck.memory_estimate(dims, cfg) <= 24 * 2**30
    assert ck.fit_dims("24GiB", cfg) == dims


def test_fit_dims_picks_the_largest_that_fits():
    cfg = ck.MemoryConfig()
    need = [ck.memory_estimate(d, cfg) for d in ck.PROGRESSION]
    assert need == sorted(need)
    for i, d in enumerate(ck.PROGRESSION):
        assert ck.fit_dims(need[i], cfg) == d
        if i + 1 < len(need):
            assert ck.fit_dims(need[i + 1] - 1, cfg) == d
    # order of the progression does not matter; custom progressions work
    assert ck.fit_dims(need[3], cfg, progression=list(reversed(ck.PROGRESSION))) == ck.PROGRESSION[3]
    assert ck.fit_dims(10**12, cfg, progression=[(8, 8, 8), (4, 4, 4)]) == (8, 8, 8)


def test_fit_dims_none_fits_names_the_budget():
    with pytest.raises(ValueError, match=r"budget of 1000 bytes.*\(16, 16, 16\)"):
        ck.fit_dims(1000, ck.MemoryConfig())
    with pytest.raises(ValueError, match="progression must not be empty"):
        ck.fit_dims(10**9, ck.MemoryConfig(), progression=[])
    with pytest.raises(ValueError, match="dims must be 3 positive ints"):
        ck.fit_dims(10**9, ck.MemoryConfig(), progression=[(4, 4)])
    with pytest.raises(TypeError, match="config must be a cellkern.MemoryConfig"):
        ck.fit_dims(10**9, {"batch": 1})


def test_breakdown_sums_to_estimate_and_counts_formulas():
    N = 10 * 12 * 14
    cfg = ck.MemoryConfig(batch=2, channels=3, competition=False)
    b = memory_breakdown((10, 12, 14), cfg)
    assert sum(b.values()) == ck.memory_estimate((10, 12, 14), cfg)
    assert b["weights"] == 26 * N * 4 and b["state"] == b["state_next"] == b["drive"] == 2 * 3 * N * 4
    assert b["traces"] == 2 * 2 * N * 4 and b["theta"] == N * 4
    ell = memory_breakdown((10, 12, 14), ck.MemoryConfig(keep=0.3, sparse_format="ell"))
    assert ell["weights"] == 8 * N * 4 and ell["ell_index"] == 8 * N and "mask" not in ell
    dense = memory_breakdown((10, 12, 14), ck.MemoryConfig(keep=0.3))
    assert dense["weights"] == 26 * N * 4 and dense["mask"] == 26 * N


def test_scratch_is_transient_above_the_kernels_cache_limit():
    small = memory_breakdown((64, 64, 48), ck.MemoryConfig())
    big = memory_breakdown((666, 666, 333), ck.MemoryConfig())
    assert "inhibition_scratch" in small and "inhibition_scratch" not in big
    assert big["activity_temporaries"] == 2 * 666 * 666 * 333 * 4  # the activity phase dominates there


def test_checkpointing_saves_memory():
    full = ck.MemoryConfig(autograd=True, steps=64, plasticity=False)
    ckpt = dataclasses.replace(full, checkpoint_every=8)
    assert ck.memory_estimate((32, 32, 24), ckpt) < ck.memory_estimate((32, 32, 24), full)


BASE = ck.MemoryConfig(autograd=True, steps=4, plasticity=True)
CHANGES = {
    "stencil": "von_neumann", "weight_dtype": torch.bfloat16, "state_dtype": torch.float16, "batch": 2,
    "channels": 2, "keep": 0.5, "sparse_format": "ell", "steps": 8, "checkpoint_every": 2,
    "optimizer_slots": 2, "plasticity": False, "competition": False, "drive": False,
}


@pytest.mark.parametrize("field", list(CHANGES))
def test_every_field_changes_the_estimate(field):
    assert {f.name for f in dataclasses.fields(ck.MemoryConfig)} == set(CHANGES) | {"autograd"}
    base = BASE if field != "sparse_format" else dataclasses.replace(BASE, keep=0.5)
    if field == "weight_dtype":  # with autograd, bf16 weights + their fp32 cast + gradients happen to tie
        base = ck.MemoryConfig()
    other = dataclasses.replace(base, **{field: CHANGES[field]})
    assert ck.memory_estimate((20, 20, 20), other) != ck.memory_estimate((20, 20, 20), base)


def test_autograd_changes_the_estimate():
    assert ck.memory_estimate((20, 20, 20), ck.MemoryConfig(autograd=True)) != \
        ck.memory_estimate((20, 20, 20), ck.MemoryConfig())


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(stencil="hexagonal"), ValueError, "MemoryConfig: stencil"),
    (dict(weight_dtype=torch.int32), TypeError, "weight_dtype must be a floating torch.dtype"),
    (dict(state_dtype="float32"), TypeError, "state_dtype must be a floating torch.dtype"),
    (dict(batch=0), ValueError, "batch must be a positive int, got 0"),
    (dict(channels=2.0), ValueError, "channels must be a positive int"),
    (dict(keep=0.0), ValueError, r"keep must be a number in \(0, 1\], got 0.0"),
    (dict(keep=1.5), ValueError, "keep must be a number"),
    (dict(sparse_format="csr"), ValueError, "sparse_format must be one of dense, ell, got 'csr'"),
    (dict(autograd=1), TypeError, "autograd must be a bool"),
    (dict(steps=4), ValueError, "set autograd=True"),
    (dict(autograd=True, steps=4, checkpoint_every=5), ValueError, r"checkpoint_every must be <= steps \(4\)"),
    (dict(autograd=True, optimizer_slots=-1), ValueError, "optimizer_slots must be an int >= 0"),
    (dict(plasticity=False), ValueError, "nothing trains"),
])
def test_bad_config_raises(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ck.MemoryConfig(**kwargs)


def test_bad_dims_raise():
    with pytest.raises(ValueError, match=r"memory_breakdown: dims must be 3 positive ints \(D, H, W\), got \(4, 0, 4\)"):
        ck.memory_estimate((4, 0, 4), ck.MemoryConfig())


@pytest.mark.parametrize("text, value", [
    ("24GB", 24 * 10**9), ("24GiB", 24 * 2**30), ("24G", 24 * 2**30), ("512 MiB", 512 * 2**20),
    ("1.5TiB", int(1.5 * 2**40)), ("100", 100), (4096, 4096), ("2kb", 2000),
])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("bad, exc", [("24 parsecs", ValueError), ("", ValueError), ("-3GB", ValueError),
                                      (0, ValueError), (True, TypeError), (2.5, TypeError)])
def test_parse_bytes_rejects(bad, exc):
    with pytest.raises(exc, match="parse_bytes: size must"):
        parse_bytes(bad)


def test_memory_budget_script_runs():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory_budget", "--dims", "12,10,8", "--no-json",
                           "--method", "profiler"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "profiler  measured" in proc.stdout
    assert "   ok   " in proc.stdout  # within the default 15 %
