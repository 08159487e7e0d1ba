"""Tiny schedules shared by the trainer, report and CLI tests."""
import dataclasses

from cellkern.train.config import ScheduleConfig, StageConfig
from cellkern.train.trainer import Trainer


def tiny_config(stage_changes=None, **changes) -> ScheduleConfig:
    """Two small stages (6×8×8 → 8×10×10, the second pruned and clustered),
    a few presentations each, read from every slice (so that the shorter
    presentations some tests ask for still read a signal, SPEC §12);
    ``stage_changes`` apply to both stages."""
    stages = [
        StageConfig("a", (6, 8, 8), 24, "discovery", 0.01, clustering_enabled=True),
        StageConfig("b", (8, 10, 10), 24, "learning", 0.02, clustering_enabled=True, sparse_keep=0.5),
    ]
    if stage_changes:
        stages = [dataclasses.replace(s, **stage_changes) for s in stages]
    kw = dict(stages=stages, batch=4, present_steps=12, leak=0.5, features="slices", monitor_every=8, cluster_every=8, eval_samples=40,
              decoder_buffer=64, rule=dataclasses.replace(ScheduleConfig().rule, stdp_lr=0.5, bcm_lr=0.5, w_init=0.3))
    kw.update(changes)
    return ScheduleConfig(**kw).validate()


def run_stages(cfg, out=None, **kwargs) -> Trainer:
    """A trainer after every stage (no final evaluation or report)."""
    t = Trainer(cfg, out, progress=False, log=lambda m: None, **kwargs)
    while t.stage < len(cfg.stages):
        t.run_stage()
    return t
