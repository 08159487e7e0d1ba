"""The staged trainer: every config field changes what runs, transfer, freeze, budget."""
import dataclasses

import pytest
import torch

import cellkern as ck

from cellkern.train.trainer import Trainer
from trainer_utils import run_stages, tiny_config


@pytest.fixture(scope="module")
def base():
    return run_stages(tiny_config())


def _weights_differ(a, b):
    return a.w.shape != b.w.shape or not torch.equal(a.w, b.w)


# field -> (changes to the stages, changes to the schedule, what must differ from the base run)
STAGE_FIELDS = {
    "name": ({"name": "renamed"}, {}, lambda a, b: a.records[0]["name"] != b.records[0]["name"]),
    "dims": ({"dims": (7, 8, 8)}, {}, lambda a, b: a.w.shape != b.w.shape),
    "steps": ({"steps": 18}, {}, lambda a, b: _weights_differ(a, b) and b.records[0]["steps"] == 18),
    "plasticity_profile": ({"plasticity_profile": "consolidation"}, {}, _weights_differ),
    "activity_threshold": ({"activity_threshold": 0.05}, {}, _weights_differ),
    "clustering_enabled": ({"clustering_enabled": False}, {},
                           lambda a, b: _weights_differ(a, b) and not b.records[1]["cluster_sizes"]),
    "memory_optimizations": ({"memory_optimizations": False}, {},
                             lambda a, b: a.records[0]["estimated_memory_bytes"] < b.records[0]["estimated_memory_bytes"]),
    "emergence_tracking": ({"emergence_tracking": False}, {},
                           lambda a, b: _weights_differ(a, b) and "weights" not in b.records[0]["history"][-1]),
    "sparse_keep": ({"sparse_keep": 0.25}, {}, lambda a, b: int(b.mask.sum()) < int(a.mask.sum())),
    "decoder_monitoring": ({"decoder_monitoring": False}, {},
                           lambda a, b: "decoder_accuracy" not in b.records[0]["history"][-1]),
    "transfer_learning": ({"transfer_learning": False}, {}, _weights_differ),
}
GLOBAL_FIELDS = {
    "stencil": {"stencil": "von_neumann"},
    "channels": {"channels": 2},
    "seed": {"seed": 5},
    "batch": {"batch": 3},
    "present_steps": {"present_steps": 8},
    "input_gain": {"input_gain": 0.5},
    "leak": {"leak": 0.3},
    "kappa": {"kappa": 0.6},
    "amplification": {"amplification": 2.0},
    "monitor_every": {"monitor_every": 6},
    "activation": {"activation": "relu"},
    "connectivity": {"connectivity": "feedforward"},
}
RULE_FIELDS = {"stdp_lr": 0.1, "a_plus": 0.03, "a_minus": 0.03, "tau_plus": 5.0, "tau_minus": 5.0, "bcm_lr": 0.1,
               "w_min": 0.05, "w_max": 0.3, "w_init": 0.2, "theta0": 0.05}


@pytest.mark.parametrize("field", list(STAGE_FIELDS))
def test_every_stage_field_changes_the_run(base, field):
    stage_changes, changes, differs = STAGE_FIELDS[field]
    other = run_stages(tiny_config(stage_changes, **changes))
    assert differs(base, other), field


@pytest.mark.parametrize("field", list(GLOBAL_FIELDS))
def test_every_global_field_changes_the_weights(base, field):
    other = run_stages(tiny_config(**GLOBAL_FIELDS[field]))
    assert _weights_differ(base, other), field


@pytest.mark.parametrize("field", list(RULE_FIELDS))
def test_every_rule_field_changes_the_weights(base, field):
    rule = dataclasses.replace(base.cfg.rule, **{field: RULE_FIELDS[field]})
    other = run_stages(tiny_config(rule=rule))
    assert _weights_differ(base, other), field


def test_cluster_settings(base):
    other = run_stages(tiny_config(cluster_every=12, clusters=3))
    sizes = other.records[0]["cluster_sizes"]
    assert [c["step"] for c in sizes] == [12, 24] and all(len(c["sizes"]) == 3 for c in sizes)
    assert [c["step"] for c in base.records[0]["cluster_sizes"]] == [8, 16, 24]


def test_decoder_settings(base):
    small = run_stages(tiny_config(decoder_buffer=4))
    assert sum(x.shape[0] for x in small.decoder.x) < sum(x.shape[0] for x in base.decoder.x)
    stiff = run_stages(tiny_config(decoder_alpha=1e6))
    X = torch.cat(base.decoder.x)
    assert stiff.decoder.alpha == 1e6 and not torch.equal(stiff.decoder.decoder.predict(X),
                                                          base.decoder.decoder.predict(X))


def test_freeze_runs_no_plasticity(monkeypatch):
    """A freeze stage after a learning stage of the same dims: the transfer is
    an exact copy, no plasticity step runs, the weights end unchanged."""
    from cellkern import ops

    cfg = tiny_config({"dims": (6, 8, 8), "sparse_keep": 1.0})
    cfg.stages[1].plasticity_profile = "freeze"
    t = Trainer(cfg, progress=False, log=lambda m: None)
    t.run_stage()
    w1 = t.w.clone()
    calls = []
    orig = ops.plasticity_step_
    monkeypatch.setattr(ops, "plasticity_step_", lambda *a, **k: calls.append(1) or orig(*a, **k))
    t.run_stage()
    assert torch.equal(t.w, w1) and not calls
    assert t.records[1]["history"], "the frozen stage still propagates and monitors"


def test_stage_starts_from_the_transferred_weights(monkeypatch):
    """With transfer on, stage 2 starts from stage 1's weights resampled; off, from fresh ones."""
    from cellkern.train import trainer as trainer_mod
    from cellkern.train.transfer import transfer

    starts = {}
    orig = trainer_mod.Trainer.start_stage

    def spy(self):
        prev = None if self.w is None else (self.w.clone(), self.pstate.theta.clone(), self.mask)
        orig(self)
        starts[self.stage] = (prev, self.w.clone())

    monkeypatch.setattr(trainer_mod.Trainer, "start_stage", spy)
    cfg = tiny_config({"sparse_keep": 1.0})
    run_stages(cfg)
    (w_prev, th_prev, m_prev), w_start = starts[1]
    want, _, _ = transfer(w_prev, th_prev, m_prev, (8, 10, 10), w_min=cfg.rule.w_min, w_max=cfg.rule.w_max)
    assert torch.equal(w_start, want)
    starts.clear()
    fresh = run_stages(tiny_config({"sparse_keep": 1.0, "transfer_learning": False}))
    assert not torch.equal(starts[1][1], want)
    assert torch.equal(starts[1][1], fresh._fresh_weights((8, 10, 10), cfg.seed * 1000 + 1))


def test_pruning_keeps_the_largest_weights_per_cell():
    from cellkern.train.monitor import BOUNDARY
    from cellkern.train.trainer import rescale_survivors

    def prune_magnitude(w, mask, keep):
        return ck.sparse.prune(w, mask, keep, of="stencil", stencil="moore", boundary=BOUNDARY)

    w = torch.rand(26, 4, 5, 5) + 0.1
    w[3] = w[4] = 5.0                      # a tie: both large, both kept
    mask = prune_magnitude(w, None, 0.1)
    z = 2                                  # an inner layer: 26 live synapses, keeps round(2.6) = 3
    assert (mask[:, z].sum(0) == 3).all() and mask[3, z].all() and mask[4, z].all()
    keep = mask[:, z].flatten(1)
    top = w[:, z].flatten(1).topk(3, dim=0).indices
    assert torch.equal(keep.gather(0, top), torch.ones_like(top, dtype=torch.bool))
    assert not mask[:9, 0].any()           # dz = -1 does not exist at z = 0
    assert (mask[:, 0].sum(0) == 2).all()  # round(0.1 · 17) synapses inside the lattice
    again = prune_magnitude(w, mask, 0.1)
    assert torch.equal(again, mask), "the same keep prunes nothing more"
    live = prune_magnitude(w, None, 1.0)
    w2 = rescale_survivors(w.clamp(max=1.0), live, mask, 0.0, 100.0)
    l1 = lambda t, m: torch.where(m, t.abs(), 0).sum(0)  # noqa: E731
    assert torch.allclose(l1(w2, mask), l1(w.clamp(max=1.0), live))


def test_budget_reduces_dims_or_stops():
    from cellkern.train.planning import stage_estimate

    cfg = tiny_config()
    need = stage_estimate(cfg, cfg.stages[1], (8, 10, 10))
    logs = []
    small = dataclasses.replace(cfg, budget=need - 1)
    with pytest.raises(ValueError, match="no dims of the progression"):
        run_stages(small)
    big = tiny_config({"dims": (20, 20, 20), "steps": 6})
    budget = stage_estimate(big, big.stages[0], (16, 16, 16)) + 1
    from cellkern.train.trainer import Trainer

    t = Trainer(dataclasses.replace(big, budget=budget), progress=False, log=logs.append)
    t.run_stage()
    assert t.records[0]["dims"] == [16, 16, 16] and "reduced to 16x16x16" in logs[0]
    off = tiny_config({"dims": (20, 20, 20), "steps": 6, "progressive_scaling": False}, budget=budget)
    with pytest.raises(ValueError, match="progressive_scaling is off"):
        Trainer(off, progress=False, log=logs.append).run_stage()


def test_transferred_mask_keeps_every_layer_connected():
    """A pruned mask carried to a deeper lattice: the layer next to the input
    face still has synapses from below (the face's missing ones do not move inward)."""
    import cellkern as ck

    cfg = tiny_config({"sparse_keep": 0.3})
    cfg.stages[1].dims = (12, 10, 10)
    t = run_stages(cfg)
    below = [k for k, o in enumerate(ck.stencil("moore").offsets.tolist()) if o[0] == -1]
    assert t.mask[below, 1:].any(0).float().mean((1, 2)).min() > 0.9
    assert not t.mask[below, 0].any()


def test_a_readout_before_the_signal_arrives_stops_with_a_clear_error():
    """SPEC §12: reading the output face of an 8-deep lattice after 3 steps reads noise: an error, not a number."""
    cfg = tiny_config(features="face", present_steps=3)
    with pytest.raises(ValueError, match=r"stage 1 \(a\): the readout reads noise: the read region's mean \|s\| "
                                         r"never exceeds 0.001 within the presentation of 3 steps"):
        run_stages(cfg)
    t = run_stages(tiny_config(features="face", present_steps=24, input_gain=4.0))  # long enough: it reads
    assert all(r["reach_step"] is not None and r["reach_step"] <= 24 for r in t.records)
    assert all(r["max_abs_feature"] >= 1e-3 for r in t.records)


def test_features_field_changes_what_the_readout_reads():
    """``features`` (SPEC §12): every slice, the output face, or the face averaged over the last half."""
    seen = {}
    for kind in ("slices", "face", "time"):
        t = run_stages(tiny_config({"sparse_keep": 1.0, "clustering_enabled": False}, features=kind,
                                   present_steps=24, input_gain=4.0))
        seen[kind] = torch.cat(t.decoder.x)
    assert seen["slices"].shape[1] == 8 * seen["face"].shape[1] == 8 * 4 * 8 * 8  # D = 8 slices of C·8·8
    assert seen["face"].shape == seen["time"].shape and not torch.equal(seen["face"], seen["time"])


def test_feedforward_connectivity_masks_every_offset_but_the_layer_below():
    t = run_stages(tiny_config({"sparse_keep": 1.0, "clustering_enabled": False}, connectivity="feedforward"))
    dz = torch.tensor([o[0] for o in ck.stencil("moore").offset_tuples])
    assert t.mask is not None and not t.mask[dz != -1].any() and t.mask[dz == -1][:, 1:].all()


def _mixing_config(**changes):
    from cellkern.train.config import default_config

    cfg = default_config()
    cfg.stages = [dataclasses.replace(cfg.stages[0], steps=9), dataclasses.replace(cfg.stages[0], name="learning",
                                                                                   plasticity_profile="learning", steps=9)]
    cfg.eval_samples, cfg.batch, cfg.monitor_every = 40, 8, 4
    for k, v in changes.items():
        setattr(cfg, k, v)
    return cfg.validate()


def test_the_mixing_model_learns_by_the_competitive_hebbian_rule(monkeypatch):
    """model = "mixing": (K, C, C, D, H, W) signed weights, the Hebbian step once per presentation, β moves."""
    calls = []
    orig = ck.ops.competitive_hebbian_step_
    monkeypatch.setattr(ck.ops, "competitive_hebbian_step_", lambda *a, **k: calls.append(k) or orig(*a, **k))
    t = run_stages(_mixing_config())
    assert t.w.shape == (26, 8, 8, 3, 8, 8) and float(t.w.min()) < 0 < float(t.w.max())
    assert len(calls) == 6 and calls[0]["eta"] == 0.05 and calls[3]["eta"] == 0.025  # discovery, then learning × 0.5
    assert not torch.equal(t.w, t.w_initial) and t.beta.shape == (8, 3, 8, 8)
    dz = torch.tensor([o[0] for o in ck.stencil("moore").offset_tuples])
    assert int(t.mask[:, 1].any(dim=(1, 2))[dz == -1].sum()) == 9 and not t.mask[dz != -1].any()
    for r in t.records:
        assert r["max_abs_feature"] >= 0.05 and 1 <= r["reach_step"] <= 3


@pytest.mark.parametrize("field, value", [("init_gain", 0.5), ("hebbian.eta", 0.2), ("hebbian.tau", 0.1),
                                          ("hebbian.eta_beta", 0.1), ("hebbian.average", "batch")])
def test_every_mixing_field_changes_the_weights(field, value):
    base = run_stages(_mixing_config())
    cfg = _mixing_config()
    if field.startswith("hebbian."):
        setattr(cfg.hebbian, field.split(".")[1], value)
    else:
        setattr(cfg, field, value)
    other = run_stages(cfg.validate())
    assert not torch.equal(base.w, other.w), field


def test_mixing_config_errors_and_old_files_stay_shared(tmp_path):
    from cellkern.train.config import config_from_dict

    assert config_from_dict({}).model == "shared"
    with pytest.raises(ValueError, match="clustering_enabled coordinates the shared model"):
        c = _mixing_config()
        c.stages[0].clustering_enabled = True
        c.validate()
    with pytest.raises(ValueError, match="set amplification = 0"):
        _mixing_config(amplification=0.5)
    with pytest.raises(ValueError, match="model must be one of shared, mixing"):
        _mixing_config(model="deep")
