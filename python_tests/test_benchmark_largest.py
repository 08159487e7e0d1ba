"""``python -m benchmarks.largest``: the smoke run, the refusal of sizes that do not fit, and its checks."""
import sys
from pathlib import Path

import torch

import cellkern as ck

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of the checkout, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import largest  # noqa: E402


def test_smoke_runs_checks_and_reports(capsys):
    assert largest.main(["--smoke", "--no-json", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "gate     one step on 20x18x17 against the reference: ok" in out
    row = next(line.split() for line in out.splitlines() if line.startswith("24x24x12"))
    assert row[3] == "ok" and float(row[7]) > 0, out  # check, steps/s


def test_sizes_that_do_not_fit_are_refused(capsys, monkeypatch):
    made = []
    monkeypatch.setattr(largest, "gate", lambda *a: (True, {}))
    monkeypatch.setattr(largest, "Stage", lambda *a, **k: made.append(a))
    assert largest.main(["--sizes", "preset", "--no-json", "--device", "cpu", "--fraction", "1e-6",
                         "--min-run-time", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "666x666x333 needs 18.7 GiB (ck.memory_estimate), more than 1e-06 of the" in out
    assert not made, "a refused size allocates nothing"


def test_largest_dims_is_the_largest_that_fits():
    cfg = largest.memory_config(1, 1)
    budget = 24 * 2**30
    d = largest.largest_dims(budget, cfg)
    a = d[2]
    assert d == (2 * a, 2 * a, a) and ck.memory_estimate(d, cfg) <= budget
    assert ck.memory_estimate((2 * a + 2, 2 * a + 2, a + 1), cfg) > budget
    args = type("A", (), {"batch": 1, "channels": 1, "fraction": 0.5})
    assert largest.resolve_sizes(["preset", "largest", "8,8,4"], torch.device("cpu"), args) \
        == [(666, 666, 333), "largest", (8, 8, 4)]


def test_largest_shrinks_by_a_measured_peak_over_its_estimate(monkeypatch):
    monkeypatch.setattr(largest, "free_memory", lambda device: 48 * 2**30)
    args = type("A", (), {"batch": 1, "channels": 1, "fraction": 0.5})
    plain, over = largest.largest_now([{"estimate_over_peak": 1.25}], torch.device("cpu"), args)
    assert plain == largest.largest_dims(24 * 2**30, largest.memory_config(1, 1)) and over == 1.0
    shrunk, over = largest.largest_now([{"estimate_over_peak": 0.5}, {"estimate_over_peak": None}],
                                       torch.device("cpu"), args)
    assert over == 2.0 and shrunk == largest.largest_dims(12 * 2**30, largest.memory_config(1, 1))


def test_spot_check_finds_a_wrong_cell():
    stage = largest.Stage((6, 5, 7), 1, 1, torch.device("cpu"), "reference")
    stage.s = stage.x.clone()
    s_new, _ = stage.propagate()
    assert largest.spot_check(stage.s, stage.w, stage.x, s_new, 16, 0) < 1e-6
    s_new[0, 0, -1, -1, -1] += 1e-3  # the last cell is always checked
    assert largest.spot_check(stage.s, stage.w, stage.x, s_new, 16, 0) > 5e-4
