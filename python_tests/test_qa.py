"""The text task (task = "qa"): gradient stages, plasticity between them, the BLEU monitor, resume, config."""
import json
import pathlib

import pytest
import torch
from click.testing import CliRunner

from cellkern.train.checkpoint import load_checkpoint
from cellkern.train.cli import main
from cellkern.train.config import RuleConfig, ScheduleConfig, StageConfig, load_config, save_config
from cellkern.train.qa import AnswerBank, QATask
from cellkern.train.text import load_qa
from cellkern.train.trainer import Trainer

PAIRS = str(pathlib.Path(__file__).parent / "data" / "qa_pairs.tsv")


def qa_config(stages=None, **changes) -> ScheduleConfig:
    """Two tiny stages on the 40-pair fixture: gradient + plasticity, then gradient only."""
    stages = stages or [StageConfig("both", (3, 8, 8), 12, "learning", gradient_lr=0.03),
                        StageConfig("grad", (4, 8, 8), 12, "freeze", gradient_lr=0.03)]
    kw = dict(task="qa", data=PAIRS, channels=2, batch=8, present_steps=3, monitor_every=4, cluster_every=4,
              rule=RuleConfig(w_min=-0.2, w_max=1.0, w_init=0.4), stages=stages)
    kw.update(changes)
    return ScheduleConfig(**kw).validate()


def run_stages(cfg, out=None, **kw) -> Trainer:
    t = Trainer(cfg, out, progress=False, log=lambda m: None, **kw)
    while t.stage < len(cfg.stages):
        t.run_stage()
    return t


def test_gradient_and_plasticity_stages_lower_the_loss():
    stages = [StageConfig("both", (3, 8, 8), 24, "learning", gradient_lr=0.03),
              StageConfig("grad", (4, 8, 8), 24, "freeze", gradient_lr=0.03)]
    t = run_stages(qa_config(stages, monitor_every=6))
    losses = [h["loss"] for r in t.records for h in r["history"]]
    assert len(losses) == 8
    assert losses[-1] < losses[0] - 0.05, losses
    for r in t.records:   # the monitor decoded its sets and scored them
        h = r["history"][-1]
        assert 0 <= h["bleu_train"] <= 100 and 0 <= h["bleu_held_out"] <= 100
        assert set(h["example_held_out"]) == {"question", "decoded", "reference"}


@pytest.mark.parametrize("profile, lr, w_moves, readout_moves", [
    ("freeze", 0.0, False, False),      # nothing learns
    ("freeze", 0.03, True, True),       # gradient only
    ("learning", 0.0, True, False),     # plasticity only
])
def test_gradient_lr_and_profile_choose_what_learns(profile, lr, w_moves, readout_moves):
    cfg = qa_config([StageConfig("s", (3, 8, 8), 4, profile, gradient_lr=lr, emergence_tracking=False)])
    t = Trainer(cfg, progress=False, log=lambda m: None)
    readout0 = t.qa.readout_w.clone()
    t.start_stage()
    w0 = t.w.clone()
    t.run_stage()
    assert (not torch.equal(t.w, w0)) == w_moves
    assert (not torch.equal(t.qa.readout_w, readout0)) == readout_moves


def test_both_mechanisms_together_differ_from_each_alone():
    def final_w(profile, lr):
        cfg = qa_config([StageConfig("s", (3, 8, 8), 4, profile, gradient_lr=lr, emergence_tracking=False)])
        return run_stages(cfg).w
    both, grad, plast = final_w("learning", 0.03), final_w("freeze", 0.03), final_w("learning", 0.0)
    assert not torch.equal(both, grad) and not torch.equal(both, plast)


def test_memory_optimizations_switch_weight_dtype_and_checkpointing():
    def run(opt):
        cfg = qa_config([StageConfig("s", (3, 8, 8), 3, "freeze", gradient_lr=0.03, memory_optimizations=opt,
                                     emergence_tracking=False, decoder_monitoring=False)], present_steps=5)
        return run_stages(cfg)
    on, off = run(True), run(False)
    assert not torch.equal(on.w, off.w)              # bf16 forward vs fp32 forward
    for t, dtype in ((on, "bfloat16"), (off, "float32")):
        am = t.records[0]["activation_memory"]
        assert am["weights"] == dtype and am["checkpoint_every"] == 2 and am["steps"] == 5
        assert am["without_checkpointing_bytes"] > 0 and am["with_checkpointing_bytes"] > 0


@pytest.mark.parametrize("stop", [5, 14])
def test_resume_is_bit_identical(tmp_path, stop):
    cfg = qa_config(checkpoint_every=3)
    ref = run_stages(cfg)
    out = tmp_path / "run"
    assert Trainer(cfg, out, progress=False, log=lambda m: None, stop_after=stop).run() is None
    t = Trainer.resume(out, progress=False, log=lambda m: None)
    assert 0 < t.done_steps <= stop
    while t.stage < len(cfg.stages):
        t.run_stage()
    final = load_checkpoint(out)
    assert torch.equal(final["w"], ref.w)
    assert torch.equal(final["qa"]["readout_w"], ref.qa.readout_w)
    assert torch.equal(final["qa"]["readout_b"], ref.qa.readout_b)
    for k, (m, v) in ref.qa.adam.items():
        assert torch.equal(final["qa"]["adam"][k][0], m) and torch.equal(final["qa"]["adam"][k][1], v)
    assert torch.equal(final["pstate"]["theta"], ref.pstate.theta)


def test_config_task_and_gradient_lr(tmp_path):
    old = load_config(pathlib.Path(__file__).parent / "data" / "schedule_v1.toml")
    assert old.task == "classify" and all(s.gradient_lr == 0 for s in old.stages)
    with pytest.raises(ValueError, match=r"stages\[0\]\.gradient_lr needs task = 'qa'"):
        ScheduleConfig(stages=[StageConfig(gradient_lr=0.1)]).validate()
    with pytest.raises(ValueError, match="task 'qa' needs data = 'qa'"):
        ScheduleConfig(task="qa").validate()
    with pytest.raises(ValueError, match="set task = 'qa'"):
        ScheduleConfig(data="qa").validate()
    with pytest.raises(ValueError, match="task must be one of classify, qa"):
        ScheduleConfig(task="translate").validate()
    with pytest.raises(ValueError, match="gradient_lr must be >= 0"):
        qa_config([StageConfig(gradient_lr=-1.0)])
    cfg = qa_config()
    save_config(cfg, tmp_path / "qa.toml")
    back = load_config(tmp_path / "qa.toml")
    assert back.task == "qa" and [s.gradient_lr for s in back.stages] == [0.03, 0.03]


def test_text_task_runs_in_one_process():
    cfg = qa_config()
    with pytest.raises(ValueError, match="parallel must be None"):
        QATask(cfg, load_qa(cfg.data), parallel="data")


def test_missing_pairs_file_is_a_clear_error(tmp_path):
    cfg = qa_config(data=str(tmp_path / "none.tsv"))
    with pytest.raises(ValueError, match="no such pairs file"):
        Trainer(cfg, progress=False, log=lambda m: None)


def test_answer_bank_decodes_its_own_vectors():
    v = torch.nn.functional.normalize(torch.randn(5, 16), dim=1)
    bank = AnswerBank(["a", "b", "a", "c", "d"], v)
    assert bank.texts == ["a", "b", "c", "d"]
    assert bank.decode(v[[1, 3, 4]] * 3) == ["b", "c", "d"]


def test_cli_run_reports_bleu_and_baselines(tmp_path):
    cfg = qa_config([StageConfig("both", (3, 8, 8), 6, "learning", gradient_lr=0.03),
                     StageConfig("grad", (4, 8, 8), 6, "freeze", gradient_lr=0.03)], monitor_every=3)
    save_config(cfg, tmp_path / "qa.toml")
    res = CliRunner().invoke(main, ["run", "--config", str(tmp_path / "qa.toml"), "--out", str(tmp_path / "run"),
                                    "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "BLEU train" in res.output and "identity lattice" in res.output and "activation memory" in res.output
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert rep["task"] == "qa"
    q = rep["quality"]
    for key in ("lattice", "identity_lattice", "copy_question", "constant_answer", "answer_bank_oracle"):
        assert 0 <= q["train"][key] <= 100 and 0 <= q["held_out"][key] <= 100
    assert q["train"]["answer_bank_oracle"] == 100.0 and "tfidf_retrieval" in q["held_out"]
    assert q["pairs"]["train"] + q["pairs"]["held_out"] == 39
    assert all("bleu_held_out" in h for s in rep["stages"] for h in s["history"])
