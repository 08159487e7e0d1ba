"""The main job on two processes (``torchrun --nproc-per-node 2``, gloo, localhost):
data parallel and domain decomposition end with exactly the one-process run's
state, and a run stopped in one mode resumes in another."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from cellkern.train import layouts as ckp
from cellkern.train.checkpoint import load_checkpoint
from cellkern.train.config import save_config
from cellkern.train.trainer import Trainer
from dist_utils import WORLD, free_port, spawn
from trainer_utils import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")
STATE = ("w", "mask", "s", "x", "batch_y", "clusters", "factor", "lr_amplification", "y_prev")


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)   # the job runs no Triton on the CPU
    return env


def _torchrun(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={WORLD}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "cellkern.train.cli", "run", "--no-progress", *args]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]
    return res


def _config():
    return tiny_config(checkpoint_every=10, features="face", present_steps=24, input_gain=4.0)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process run of the config: its final checkpoint and report."""
    out = tmp_path_factory.mktemp("single")
    report = Trainer(_config(), out, progress=False, log=lambda m: None).run()
    return load_checkpoint(out), report


def assert_same_state(got: dict, want: dict) -> None:
    for k in STATE:
        assert (got[k] is None) == (want[k] is None), k
        if want[k] is not None:
            assert torch.equal(got[k], want[k]), k
    for k in ("x_pre", "x_post", "theta"):
        assert torch.equal(got["pstate"][k], want["pstate"][k]), k
    assert (got["stage"], got["step"], got["done_steps"]) == (want["stage"], want["step"], want["done_steps"])


@pytest.mark.parametrize("mode", ckp.MODES)
def test_torchrun_two_processes_equal_one(mode, single, tmp_path):
    """``torchrun --nproc-per-node 2 -m cellkern.train.cli run --parallel MODE``: the
    same weights, state, clusters, decoders and held-out scores as one process."""
    cfg_path = tmp_path / "cfg.toml"
    save_config(_config(), cfg_path)
    out = tmp_path / "run"
    res = _torchrun("--config", str(cfg_path), "--out", str(out), "--parallel", mode)
    assert res.stdout.count("held-out accuracy") == 1          # rank 0 alone prints
    ckpt, (want_ckpt, want_report) = load_checkpoint(out), single
    assert_same_state(ckpt, want_ckpt)
    assert not torch.equal(ckpt["w"], torch.zeros_like(ckpt["w"]))
    report = json.loads((out / "report.json").read_text())
    assert report["quality"]["trained"] == want_report["quality"]["trained"]
    for got, want in zip(report["stages"], want_report["stages"]):
        assert [h.get("decoder_accuracy") for h in got["history"]] == \
               [h.get("decoder_accuracy") for h in want["history"]]
        assert got["cluster_sizes"] == want["cluster_sizes"]
        par = got["parallel"]
        assert (par["mode"], par["world"]) == (mode, WORLD)
        if mode == "domain":   # rank 0 held the lower half of z, and exchanged halos
            assert par["slab"] == [0, got["dims"][0] // 2] and par["halo_seconds"] > 0


def _stopped_domain_run(rank, out):
    with pytest.raises(ValueError, match="batch must be a multiple of 2, got 3"):
        Trainer(dataclasses.replace(_config(), batch=3), parallel="data", progress=False)
    t = Trainer(_config(), out, parallel="domain", progress=False, log=lambda m: None, stop_after=35)
    while t.stage < len(t.cfg.stages) and t.run_stage():
        pass
    assert t.done_steps == 35
    assert t.w.shape[1] == 8            # stopped mid-stage: the trainer holds the whole lattice again


def test_a_run_stopped_in_one_mode_resumes_in_another(single, tmp_path):
    """Domain-decomposed run killed after step 35 (last checkpoint at 30), resumed
    by ``torchrun … --resume --parallel data``: the one-process run's end state."""
    out = tmp_path / "run"
    spawn(_stopped_domain_run, str(out))
    assert load_checkpoint(out)["done_steps"] == 30
    _torchrun("--resume", str(out), "--parallel", "data")
    assert_same_state(load_checkpoint(out), single[0])


def test_parallel_errors():
    with pytest.raises(ValueError, match="parallel must be None or one of 'data', 'domain', got 'model'"):
        Trainer(_config(), parallel="model")
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
            Trainer(_config(), parallel="domain")
    env = _env()
    env.pop("WORLD_SIZE", None)
    res = subprocess.run([sys.executable, "-m", "cellkern.train.cli", "run", "--parallel", "data", "--out",
                          os.devnull], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "runs under torchrun" in res.stderr
