"""The main job on a device (config ``device``, ``cellkern run --device``), tested without a GPU.

The plumbing runs on the CPU with the default device set to ``meta``: a tensor
the run creates without naming its device (``torch.zeros(n)`` where
``torch.zeros(n, device=w.device)`` was meant) then lands on ``meta``, and a
dispatch spy that records the device of every tensor every op returns finds
it. On a GPU such a tensor would be a CPU tensor meeting CUDA ones.
"""
import collections
import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from cellkern.train import planning
from cellkern.train import trainer as trainer_mod
from cellkern.train.cli import main
from cellkern.train.config import ScheduleConfig, config_from_dict, load_config, save_config
from cellkern.train.trainer import Trainer
from trainer_utils import tiny_config

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a GPU")


class DeviceSpy(TorchDispatchMode):
    """Counts ``(device type, op)`` of every tensor every dispatched op returns."""

    def __init__(self):
        super().__init__()
        self.seen = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.seen[(t.device.type, str(func))] += 1
        return out

    def off_device(self, device: torch.device) -> dict:
        return {op: n for (dev, op), n in self.seen.items() if dev != device.type}


@pytest.fixture
def meta_default():
    """The default device is ``meta`` while the test runs (a factory call without a device lands there)."""
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def test_the_meta_default_catches_a_tensor_made_without_its_device(meta_default):
    """The check itself: a device-less factory is seen, a device-aware one is not."""
    w = torch.ones(3, device="cpu")
    with DeviceSpy() as bad:
        torch.zeros(3)
    with DeviceSpy() as good:
        torch.zeros(3, device=w.device) + w
    assert bad.off_device(w.device) == {"aten.zeros.default": 1}
    assert good.off_device(w.device) == {} and sum(good.seen.values()) == 2


def test_a_run_creates_every_tensor_on_its_device(meta_default, tmp_path):
    """A whole tiny run — two stages with transfer, pruning, clustering,
    emergence tracking, lr amplification, the monitor, checkpoints, a resume,
    the final evaluation, the report and its plots — on ``device=torch.device("cpu")``:
    no op returns a tensor anywhere else."""
    cfg = tiny_config(device=torch.device("cpu"), checkpoint_every=10, eval_samples=20)
    assert cfg.device == "cpu"
    with DeviceSpy() as spy:
        stopped = Trainer(cfg, tmp_path, progress=False, log=lambda m: None, stop_after=30)
        assert stopped.run() is None
        resumed = Trainer.resume(tmp_path, device=torch.device("cpu"), progress=False, log=lambda m: None)
        report = resumed.run()
    assert spy.off_device(torch.device("cpu")) == {}
    assert sum(spy.seen.values()) > 1000, "the spy saw the run"
    assert report["device"] == "cpu" and (tmp_path / "weight_spectrum.png").is_file()
    for name in Trainer._TENSORS:
        t = getattr(resumed, name)
        assert t is None or t.device == torch.device("cpu"), name


def test_config_device_values(tmp_path):
    assert ScheduleConfig().validate().device == "cpu"
    assert tiny_config(device=torch.device("cpu")).device == "cpu"
    assert tiny_config(device=torch.device("cuda", 1)).device == "cuda:1", "a GPU config loads on any machine"
    for v in ("cuda", "cuda:0", "auto", "cpu"):
        cfg = tiny_config(device=v)
        again = load_config(save_config(cfg, tmp_path / "c.toml"))
        assert again.device == v
    old = load_config(__import__("pathlib").Path(__file__).parent / "data" / "schedule_v1.toml")
    assert old.device == "cpu", "a config written before the key runs where it ran"
    for bad in ("gpu", "meta", "cpu:1", "cuda:x", ""):
        with pytest.raises(ValueError, match=r"config: device must be one of cpu, cuda, cuda:N or auto"):
            config_from_dict({"device": bad})
    with pytest.raises(TypeError, match=r"config: device must be a string .* got int 0"):
        config_from_dict({"device": 0})


@NO_GPU
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    msg = r"config: device is 'cuda', but torch sees no CUDA device .*device = \"cpu\""
    with pytest.raises(ValueError, match=msg):
        Trainer(tiny_config(device="cuda"), progress=False, log=lambda m: None)
    path = save_config(tiny_config(), tmp_path / "tiny.toml")
    res = CliRunner().invoke(main, ["run", "--config", str(path), "--out", str(tmp_path / "run"), "--device", "cuda"])
    assert res.exit_code != 0 and "config: device is 'cuda', but torch sees no CUDA device" in res.output
    res = CliRunner().invoke(main, ["run", "--config", str(path), "--out", str(tmp_path / "r2"), "--device", "tpu"])
    assert res.exit_code != 0 and "config: device must be one of cpu, cuda, cuda:N or auto, got 'tpu'" in res.output


def test_auto_takes_the_gpu_only_when_torch_sees_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert planning.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert planning.resolve_device("auto") == torch.device("cuda", 0)
    assert planning.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert planning.resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device is 'cuda:2', but torch sees 2 CUDA device\(s\)"):
        planning.resolve_device("cuda:2")


def test_the_budget_defaults_to_the_run_devices_memory(monkeypatch):
    asked = []
    monkeypatch.setattr(planning, "device_memory", lambda device=None: asked.append(device) or 10**12)
    cfg = tiny_config(device="auto")
    assert planning.fit_stage(cfg, cfg.stages[0]) == (6, 8, 8)
    assert asked == ["auto"]
    assert planning.fit_stage(dataclasses.replace(cfg, budget=10**9), cfg.stages[0]) == (6, 8, 8)
    assert asked == ["auto"], "a budget in the config is used as it is"
    monkeypatch.undo()
    import os

    assert planning.device_memory(torch.device("cpu")) == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_a_checkpoint_loads_onto_the_run_device(tmp_path, monkeypatch):
    """Resuming moves every saved tensor (weights, mask, traces, θ, state, drive,
    clusters, factors, lr amplification) to the resuming run's device — here
    ``meta``, standing in for a GPU — and leaves the generator state on the CPU."""
    cfg = tiny_config(checkpoint_every=10)
    Trainer(cfg, tmp_path, progress=False, log=lambda m: None, stop_after=40).run()
    t = Trainer.resume(tmp_path, progress=False, log=lambda m: None)
    assert t.clusters is not None and t.factor is not None and t.lr_amplification is not None
    moved = Trainer(cfg, progress=False, log=lambda m: None)
    moved.device = torch.device("meta")
    moved.load_state_dict(t.state_dict())
    for name in Trainer._TENSORS:
        v = getattr(moved, name)
        assert v is None or v.device.type == "meta", name
    for name, v in vars(moved.pstate).items():
        assert not isinstance(v, torch.Tensor) or v.device.type == "meta", name
    assert torch.equal(moved.gen.get_state(), t.gen.get_state())
    assert moved.decoder.x and all(x.device.type == "cpu" for x in moved.decoder.x), "the decoder buffer stays on the CPU"


def test_resume_with_a_device_continues_there(tmp_path):
    """``--resume --device`` overrides the run's config and the rewritten config
    says so; the weights equal those of the uninterrupted run."""
    cfg = tiny_config(checkpoint_every=10, eval_samples=20, device="auto")
    whole = Trainer(cfg, progress=False, log=lambda m: None)
    while whole.stage < len(cfg.stages):
        whole.run_stage()
    Trainer(cfg, tmp_path, progress=False, log=lambda m: None, stop_after=30).run()
    res = CliRunner().invoke(main, ["run", "--resume", str(tmp_path), "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert load_config(tmp_path / "config.toml").device == "cpu"
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["device"] == "cpu" and rep["config"]["device"] == "cpu"
    assert "device: cpu" in res.output
    t = Trainer.resume(tmp_path, progress=False, log=lambda m: None)
    assert torch.equal(t.w, whole.w)


def test_parallel_runs_stay_on_the_cpu(monkeypatch):
    monkeypatch.setattr(trainer_mod, "resolve_device", lambda device: torch.device("cuda", 0))
    with pytest.raises(ValueError, match=r"parallel='data' runs its processes on the CPU .* device must be \"cpu\""):
        Trainer(tiny_config(device="cuda"), progress=False, log=lambda m: None, parallel="data")


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _diverged(a: torch.Tensor, b: torch.Tensor) -> float:
    """The share of weights that differ by more than 1e-4 (kernels of two devices
    round differently, and a near-tie of the winners then decides a cell apart)."""
    return float(((a.double().cpu() - b.double().cpu()).abs() > 1e-4).float().mean())


@GPU
def test_cuda_run_matches_the_cpu_run():
    """The tiny run on the GPU: every tensor there, and the weights of the CPU run up to rounding."""
    from trainer_utils import run_stages

    gpu, cpu = run_stages(tiny_config(device="cuda")), run_stages(tiny_config(device="cpu"))
    for name in Trainer._TENSORS:
        v = getattr(gpu, name)
        assert v is None or v.is_cuda, name
    assert gpu.pstate.theta.is_cuda and gpu.x.is_cuda and gpu.batch_y.is_cuda
    assert gpu.records[-1]["peak_memory_bytes"] > 0
    assert _diverged(gpu.w, cpu.w) < 1e-3 and float((gpu.mask.cpu() == cpu.mask).float().mean()) > 0.99


@GPU
def test_cuda_checkpoint_resumes_on_the_cpu_and_back(tmp_path):
    """GPU → CPU → GPU: each move of a checkpoint is exact; the resumed run ends
    with the uninterrupted GPU run's weights up to the two devices' rounding."""
    cfg = tiny_config(checkpoint_every=10, device="cuda")
    whole = Trainer(cfg, progress=False, log=lambda m: None)
    while whole.stage < len(cfg.stages):
        whole.run_stage()
    Trainer(cfg, tmp_path, progress=False, log=lambda m: None, stop_after=20).run()
    saved = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=False)
    on_cpu = Trainer.resume(tmp_path, device="cpu", progress=False, log=lambda m: None, stop_after=30)
    assert on_cpu.device.type == "cpu" and torch.equal(on_cpu.w, saved["w"]) and not on_cpu.w.is_cuda
    on_cpu.run()
    back = Trainer.resume(tmp_path, device="cuda", progress=False, log=lambda m: None)
    assert back.w.is_cuda and torch.equal(back.w.cpu(), on_cpu.w)
    back.run()
    assert _diverged(back.w, whole.w) < 1e-3
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["device"].startswith("cuda:") and rep["config"]["device"] == "cuda"
