"""No leaks in the main job: after a warm-up, a few hundred steps of a small
schedule (checkpoints, monitor, decoder, emergence, clustering all on) leave
the live tensor count exactly where it was, and the resident set within a
tolerance (see RSS_TOLERANCE). The long version is ``python -m benchmarks.soak``.
"""
import gc

import pytest

from cellkern.train.trainer import Trainer
from trainer_utils import tiny_config

#: monitor 24, cluster 24, present 12, checkpoint 24: every periodic event
#: recurs every 24 steps, so states 24 steps apart must hold the same tensors
PERIOD = 24
#: the decoder's rolling buffer (32 samples, 4 per presentation of 12 steps) is
#: full after 96 steps; the warm-up also covers the first checkpoints and clusterings
WARMUP = 5 * PERIOD
MEASURED = 10 * PERIOD
#: RSS after the first measured period (the heap still settles in it: +0 to
#: +1.5 MiB) to the end, measured on the 2-core dev machine (load average ~15,
#: 6 runs of this test's procedure): +0.34, +0.08, +0.39, +0.34, +0.08,
#: +0.08 MiB. A tolerance of 3 MiB (~8x the largest) still catches a leak of
#: 13 KiB a step over the 240 steps: one state-sized tensor (B·C·N·4 B = 51 KiB)
#: a step would add 12 MiB; the live tensor count catches every leaked tensor object.
RSS_TOLERANCE = 3 * 2**20


def _rss():
    import os

    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live_tensors():
    import torch

    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_no_growth_over_hundreds_of_steps(tmp_path):
    cfg = tiny_config(checkpoint_every=PERIOD, monitor_every=PERIOD, cluster_every=PERIOD, eval_samples=20,
                      decoder_buffer=32)
    cfg.stages = cfg.stages[1:]                          # one stage: pruned, clustered, emergence on
    cfg.stages[0].steps = WARMUP + MEASURED + PERIOD
    t = Trainer(cfg, tmp_path / "run", progress=False, log=lambda m: None, stop_after=WARMUP)
    assert t.run() is None
    counts, rss = [_live_tensors()], [_rss()]
    for k in range(1, MEASURED // PERIOD + 1):
        t.stop_after = WARMUP + k * PERIOD
        assert t.run() is None
        counts.append(_live_tensors())
        rss.append(_rss())
    assert t.done_steps == WARMUP + MEASURED
    assert counts == [counts[0]] * len(counts), f"live tensors every {PERIOD} steps: {counts}"
    growth = rss[-1] - rss[1]
    assert growth <= RSS_TOLERANCE, f"RSS grew {growth / 2**20:.2f} MiB over {MEASURED} steps: " \
                                    f"{[round(r / 2**20, 1) for r in rss]} MiB"
