"""Faults around a run: checkpoints that would run code, torn or corrupted
checkpoints, failed writes, SIGTERM/SIGINT, and two runs on one folder."""
import errno
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from cellkern.train.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from cellkern.train.config import save_config
from cellkern.train.trainer import Trainer
from trainer_utils import run_stages, tiny_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "cellkern.train.cli", "run", "--no-progress"]


def _env():
    """The subprocess imports this checkout's cellkern (as ``-m`` from ROOT does)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


class _Planted:
    """Unpickling this calls ``os.system``: the checkpoint a stranger could send."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _run_folder(tmp_path, **changes):
    cfg = tiny_config(eval_samples=20, **changes)
    out = tmp_path / "run"
    out.mkdir()
    save_config(cfg, out / "config.toml")
    return cfg, out


# -- checkpoints are data, not code -------------------------------------------------------------
def test_planted_code_in_a_checkpoint_is_refused_and_runs_nothing(tmp_path):
    """`cellkern run --resume` on a folder whose checkpoint would run a shell
    command when unpickled: refused with a clear error naming the file; the
    command never runs (no marker file), no traceback."""
    _, out = _run_folder(tmp_path)
    marker = tmp_path / "PWNED"
    torch.save({"w": _Planted(marker), "stage": 0}, out / CHECKPOINT_NAME)
    res = subprocess.run(CLI + ["--resume", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env=_env())
    assert not marker.exists(), "unpickling the checkpoint ran the planted command"
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    assert "refused" in res.stderr and str(out / CHECKPOINT_NAME) in res.stderr, res.stderr


def test_planted_code_refused_in_process(tmp_path):
    _, out = _run_folder(tmp_path)
    marker = tmp_path / "PWNED"
    torch.save({"w": _Planted(marker)}, out / CHECKPOINT_NAME)
    with pytest.raises(ValueError, match="refused .*checkpoint.pt.*could run code"):
        Trainer.resume(out, progress=False, log=lambda m: None)
    assert not marker.exists()


def test_checkpoint_holds_only_data(tmp_path):
    """The trainer's state after a stage with decoder, clusters and plasticity
    loads with weights_only=True, and holds no objects of cellkern's classes."""
    out = tmp_path / "run"
    run_stages(tiny_config(eval_samples=20, stages=tiny_config().stages[:1]), out)
    state = torch.load(out / CHECKPOINT_NAME, weights_only=True)

    def kinds(x):
        if isinstance(x, dict):
            return set().union(*(kinds(v) for v in x.values()), *(kinds(k) for k in x)) if x else set()
        if isinstance(x, (list, tuple)):
            return set().union(*(kinds(v) for v in x)) if x else set()
        return {type(x)}

    assert kinds(state) <= {torch.Tensor, int, float, str, bool, type(None)}
    assert state["decoder"]["decoder"] is not None        # a fitted ridge, stored as tensors


@pytest.mark.parametrize("damage", ["empty", "truncated", "cut-tail", "garbage", "zeroed-header", "not-a-dict",
                                    "missing-fields"])
def test_damaged_checkpoint_is_a_clear_error(tmp_path, damage):
    out = tmp_path / "run"
    run_stages(tiny_config(eval_samples=20, stages=tiny_config().stages[:1]), out)
    path = out / CHECKPOINT_NAME
    data = path.read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "cut-tail":
        path.write_bytes(data[:-20])
    elif damage == "garbage":
        path.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(4096)))
    elif damage == "zeroed-header":
        path.write_bytes(b"\0" * 64 + data[64:])
    elif damage == "not-a-dict":
        torch.save([torch.ones(2)], path)
    else:
        torch.save({"stage": 0, "w": torch.ones(2)}, path)
    with pytest.raises(ValueError, match=f"resume: .*{path.name}") as ei:
        Trainer.resume(out, progress=False, log=lambda m: None)
    assert str(path) in str(ei.value)


def test_damaged_checkpoint_cli_has_no_traceback(tmp_path):
    _, out = _run_folder(tmp_path)
    (out / CHECKPOINT_NAME).write_bytes(b"PK\x03\x04 not really a zip")
    res = subprocess.run(CLI + ["--resume", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env=_env())
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert str(out / CHECKPOINT_NAME) in res.stderr and "corrupted" in res.stderr, res.stderr


# -- a checkpoint write that fails --------------------------------------------------------------
def test_failed_checkpoint_write_keeps_the_previous_one_and_stops_clearly(tmp_path, monkeypatch):
    """The third checkpoint write fails half-way (disk full): `cellkern run`
    stops with a clear error naming the folder (exit 1, no traceback), the
    second checkpoint is intact with no temporary file beside it, and resuming
    from it ends with the uninterrupted run's weights."""
    cfg = tiny_config(checkpoint_every=5, eval_samples=20)
    save_config(cfg, tmp_path / "tiny.toml")
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def disk_full(obj, fh, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            fh.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, fh, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    from cellkern.train.cli import main

    res = CliRunner().invoke(main, ["run", "--config", str(tmp_path / "tiny.toml"), "--out", str(out),
                                    "--no-progress"])
    monkeypatch.setattr(torch, "save", real_save)
    assert len(calls) == 3
    assert res.exit_code == 1, (res.output, res.exception)
    assert isinstance(res.exception, SystemExit), repr(res.exception)       # a clean error, not a crash
    assert str(out) in res.output and "No space left on device" in res.output, res.output
    assert sorted(p for p in os.listdir(out) if p != "run.lock") == [CHECKPOINT_NAME, "config.toml"]
    state = load_checkpoint(out)
    assert state["done_steps"] == 10                       # the second checkpoint, whole
    resumed = Trainer.resume(out, progress=False, log=lambda m: None)
    while resumed.stage < len(cfg.stages):
        resumed.run_stage()
    assert torch.equal(resumed.w, run_stages(cfg).w)


def test_failed_write_of_any_kind_is_a_clear_error(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, {"w": torch.ones(3)})

    def eio(src, dst):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", eio)
    with pytest.raises(ValueError, match=f"writing to '{tmp_path}' failed .*Input/output error"):
        save_checkpoint(tmp_path, {"w": torch.zeros(3)})
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(tmp_path)["w"], torch.ones(3))
    assert os.listdir(tmp_path) == [CHECKPOINT_NAME]


# -- SIGTERM / SIGINT ---------------------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_at_a_step_boundary_and_resumes_exactly(tmp_path, signum):
    """A real SIGTERM / SIGINT to `cellkern run` mid-stage (no periodic
    checkpoints: only stage ends would be saved): the run writes a checkpoint
    at the next step boundary, exits with 128 + signum, and the resumed run
    ends bit-identical to an uninterrupted one."""
    cfg = tiny_config(eval_samples=20, monitor_every=50, cluster_every=50)
    cfg.stages[0].steps, cfg.stages[1].steps = 12, 400
    save_config(cfg, tmp_path / "tiny.toml")
    out = tmp_path / "run"
    proc = subprocess.Popen(CLI + ["--config", str(tmp_path / "tiny.toml"), "--out", str(out)], cwd=ROOT,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ckpt = out / CHECKPOINT_NAME
    deadline = time.monotonic() + 180
    while not ckpt.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    time.sleep(random.uniform(0.05, 0.3))                 # inside stage 2, between its (absent) checkpoints
    assert proc.poll() is None, "the run finished before it could be signalled"
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, (proc.returncode, stderr[-2000:])
    assert "Traceback" not in stderr and signal.Signals(signum).name in stderr, stderr[-2000:]
    state = load_checkpoint(out)
    assert state["stage"] == 1 and 12 < state["done_steps"] < 412, (state["stage"], state["done_steps"])
    res = subprocess.run(CLI + ["--resume", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env=_env())
    assert res.returncode == 0, res.stderr[-2000:]
    final = load_checkpoint(out)
    want = run_stages(cfg)
    assert torch.equal(final["w"], want.w)
    assert torch.equal(final["pstate"]["theta"], want.pstate.theta)
    assert torch.equal(final["mask"], want.mask)


def test_signal_in_process_stops_at_the_next_step(tmp_path):
    """The handler only sets a flag: the step in flight finishes, the checkpoint
    is the state after it, and the handlers are restored afterwards."""
    from cellkern.train.trainer import RunInterrupted

    cfg = tiny_config(eval_samples=20)
    before = signal.getsignal(signal.SIGTERM)
    t = Trainer(cfg, tmp_path / "run", progress=False, log=lambda m: None)
    real = t.run_stage

    def run_stage():
        if t.stage == 0 and t.done_steps == 0:
            t.stop_after = 7
            real()                                           # 7 steps, then raise the signal mid-stage
            t.stop_after = None
            os.kill(os.getpid(), signal.SIGTERM)
        return real()

    t.run_stage = run_stage
    with pytest.raises(RunInterrupted, match="SIGTERM") as ei:
        t.run()
    assert ei.value.exit_status == 143
    assert load_checkpoint(tmp_path / "run")["done_steps"] == 7
    assert signal.getsignal(signal.SIGTERM) is before


# -- one run per folder -------------------------------------------------------------------------
def test_second_run_on_the_same_folder_is_refused(tmp_path):
    from cellkern.train.checkpoint import RunLockedError

    cfg = tiny_config(eval_samples=20)
    out = tmp_path / "run"
    first = Trainer(cfg, out, progress=False, log=lambda m: None)
    config_before = (out / "config.toml").read_text()
    other = tiny_config(eval_samples=20, seed=7)
    with pytest.raises(RunLockedError, match=f"run folder '{out}' is in use by another run \\(pid {os.getpid()}"):
        Trainer(other, out, progress=False, log=lambda m: None)
    assert (out / "config.toml").read_text() == config_before         # the second wrote nothing
    first.run()                                                       # releases the folder at its end
    Trainer.resume(out, progress=False, log=lambda m: None).close()


def test_second_cli_run_fails_clearly_and_a_dead_runs_lock_is_taken_over(tmp_path):
    cfg, out = _run_folder(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from cellkern.train.checkpoint import RunLock; "
                               "lock = RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)",
                               str(out)], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        res = subprocess.run(CLI + ["--resume", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                             env=_env())
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
        assert f"run folder '{out}' is in use by another run (pid {holder.pid}" in res.stderr, res.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert (out / "run.lock").exists()                 # left behind by the killed holder: stale
    t = Trainer.resume(out, progress=False, log=lambda m: None)   # taken over
    assert (out / "run.lock").read_text().strip() == str(os.getpid())
    t.close()
