"""Checkpoints: atomic writes, and a killed run resumed ends with the weights of an uninterrupted one."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from cellkern.train.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from cellkern.train.config import save_config
from cellkern.train.trainer import Trainer
from trainer_utils import run_stages, tiny_config


def test_save_is_atomic(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, {"w": torch.ones(3)})

    def torn(obj, fh):
        fh.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, {"w": torch.zeros(3)})
    assert torch.equal(load_checkpoint(tmp_path)["w"], torch.ones(3))
    assert os.listdir(tmp_path) == [CHECKPOINT_NAME]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path)


def _cfg():
    return tiny_config(checkpoint_every=5, eval_samples=20)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    run_stages(_cfg(), out)
    return load_checkpoint(out)


@pytest.mark.parametrize("stop", [3, 13, 24, 31, 47])
def test_resume_after_any_step_matches(tmp_path, uninterrupted, stop):
    """Stopped before the first checkpoint, mid-stage, at a stage end, in the last stage."""
    t = Trainer(_cfg(), tmp_path, progress=False, log=lambda m: None, stop_after=stop)
    assert t.run() is None
    resumed = Trainer.resume(tmp_path, progress=False, log=lambda m: None)
    assert resumed.done_steps <= stop
    while resumed.stage < 2:
        resumed.run_stage()
    final = load_checkpoint(tmp_path)
    assert torch.equal(final["w"], uninterrupted["w"])
    assert torch.equal(final["pstate"]["theta"], uninterrupted["pstate"]["theta"])
    assert torch.equal(final["mask"], uninterrupted["mask"])


def test_killed_subprocess_resumes_to_the_same_weights(tmp_path):
    """A real SIGKILL of ``cellkern run`` in the middle of the schedule."""
    cfg = tiny_config(checkpoint_every=5, eval_samples=20, monitor_every=50, cluster_every=50)
    cfg.stages[0].steps = cfg.stages[1].steps = 150       # long enough to be killed mid-run
    save_config(cfg, tmp_path / "tiny.toml")
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "cellkern.train.cli", "run", "--config", str(tmp_path / "tiny.toml"), "--no-progress"]
    proc = subprocess.Popen(cmd + ["--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / CHECKPOINT_NAME
    deadline = time.monotonic() + 120
    while not ckpt.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    time.sleep(random.uniform(0.0, 0.3))                # somewhere after the first checkpoint
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    state = load_checkpoint(killed)
    assert state["stage"] < 2, "killed before the end"
    res = subprocess.run([sys.executable, "-m", "cellkern.train.cli", "run", "--resume", str(killed), "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "resumed" in res.stdout + res.stderr
    assert (killed / "report.json").is_file()
    assert torch.equal(load_checkpoint(killed)["w"], run_stages(cfg).w)
