"""The run's report and plots, and the ``cellkern run`` / ``cellkern plan`` commands."""
import json

import pytest
from click.testing import CliRunner

from cellkern.train.cli import main
from cellkern.train.config import save_config
from cellkern.train.trainer import Trainer
from trainer_utils import tiny_config

STAGE_KEYS = {"name", "dims", "steps", "seconds", "synapse_updates_per_s", "peak_memory_bytes",
              "estimated_memory_bytes", "decoder_accuracy", "history", "cluster_sizes"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = tiny_config(eval_samples=60)
    path = save_config(cfg, out / "tiny.toml")
    res = CliRunner().invoke(main, ["run", "--config", str(path), "--out", str(out / "run"), "--no-progress"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return out / "run", res.output


def test_report_keys(tiny_run):
    out, _ = tiny_run
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["stages"]) == 2
    for st in rep["stages"]:
        assert STAGE_KEYS <= set(st)
        assert st["steps"] == 24 and st["seconds"] > 0 and st["synapse_updates_per_s"] > 0
        assert st["peak_memory_bytes"] > 0 and st["estimated_memory_bytes"] > 0
        assert st["process_peak_rss_bytes"] >= st["peak_memory_bytes"]
        h = st["history"][-1]
        assert {"step", "activity", "step_seconds", "synapse_updates_per_s", "memory_bytes", "decoder_accuracy",
                "weights", "activity_field"} <= set(h)
        assert {"spectral_entropy", "dominant_wavelength"} <= set(h["weights"])
        assert "branching_ratio" in h
    assert rep["stages"][1]["cluster_sizes"] and sum(rep["stages"][1]["cluster_sizes"][-1]["sizes"]) == 8 * 10 * 10
    q = rep["quality"]
    for k in ("trained", "untrained", "raw_pixels", "random_features"):
        assert 0.0 <= q[k]["accuracy"] <= 1.0 and q[k]["alpha"] in (1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3, 1e4)
        assert q[k]["max_abs_feature"] >= 1e-3
    assert q["raw_pixels"]["accuracy"] > 0.5, "a ridge decoder on the pixels of digits is far above chance"
    assert q["random_features"]["features"] == q["trained"]["features"]
    for st in rep["stages"]:
        assert st["max_abs_feature"] >= 1e-3 and 1 <= st["reach_step"] <= rep["config"]["present_steps"]
    assert 0.0 <= rep["monitor_overhead"] < 10.0


def test_plots_and_summary(tiny_run):
    out, output = tiny_run
    for name in ("training.png", "slices.png", "weight_spectrum.png"):
        assert (out / name).stat().st_size > 1000
        assert name in output
    assert "| stage | dims |" in output and "| b | 8×10×10 | 24 |" in output
    assert "held-out accuracy (ridge, alpha by CV): trained lattice" in output


def test_eval_samples_limits_the_quality_evaluation(tiny_run, tmp_path):
    rep = json.loads((tiny_run[0] / "report.json").read_text())
    assert rep["quality"]["train_samples"] == 60 and rep["quality"]["test_samples"] == 60
    t = Trainer(tiny_config(eval_samples=30), progress=False, log=lambda m: None)
    while t.stage < 2:
        t.run_stage()
    from cellkern.train.report import evaluate_quality

    q = evaluate_quality(t)
    assert q["train_samples"] == 30 and q["test_samples"] == 30


def test_plan_prints_stages_and_the_largest_preset(tmp_path):
    res = CliRunner().invoke(main, ["plan", "--budget", "24GB"])
    assert res.exit_code == 0, res.output
    assert "3x8x8" in res.output and "192" in res.output  # the built-in run: default_config()
    assert "largest preset that fits" in res.output
    path = save_config(tiny_config(), tmp_path / "t.toml")
    res = CliRunner().invoke(main, ["plan", "--budget", "200KB", "--config", str(path)])
    assert res.exit_code == 0, res.output
    assert "8x10x10" in res.output and "no" in res.output


@pytest.mark.parametrize("text, words", [
    ("sed = 1\n", "unknown key(s): 'sed'"),
    ("seed = 'x'\n", "seed must be an integer"),
    ("[[stages]]\ndims = [0, 4, 4]\n", "dims must be positive"),
])
def test_run_rejects_bad_configs(tmp_path, text, words):
    (tmp_path / "bad.toml").write_text(text)
    res = CliRunner().invoke(main, ["run", "--config", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and words in res.output


def test_resume_needs_a_run(tmp_path):
    res = CliRunner().invoke(main, ["run", "--resume", str(tmp_path)])
    assert res.exit_code != 0 and "holds no run" in res.output


def test_data_from_idx_files(tmp_path):
    """``data`` = an IDX image file with ``data_labels``: the run trains on it."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = (rng.random((40, 6, 6)) * 255).astype(np.uint8)
    y = np.arange(40, dtype=np.uint8) % 4
    (tmp_path / "img.idx").write_bytes(bytes([0, 0, 8, 3]) + np.array([40, 6, 6], ">u4").tobytes() + x.tobytes())
    (tmp_path / "lab.idx").write_bytes(bytes([0, 0, 8, 1]) + np.array([40], ">u4").tobytes() + y.tobytes())
    cfg = tiny_config(data=str(tmp_path / "img.idx"), data_labels=str(tmp_path / "lab.idx"))
    t = Trainer(cfg, progress=False, log=lambda m: None)
    assert t.data.n_classes == 4 and tuple(t.data.train_x.shape[1:]) == (6, 6)
    t.run_stage()
    with pytest.raises(ValueError, match="labels_path is needed"):
        Trainer(tiny_config(data=str(tmp_path / "img.idx")), progress=False)


def test_run_reports_a_budget_too_small(tmp_path):
    path = save_config(tiny_config({"progressive_scaling": False}, budget=1000), tmp_path / "t.toml")
    res = CliRunner().invoke(main, ["run", "--config", str(path), "--out", str(tmp_path / "o"), "--no-progress"])
    assert res.exit_code != 0 and "progressive_scaling is off" in res.output
