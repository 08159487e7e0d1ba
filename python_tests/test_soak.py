"""The soak benchmark's statistics, and a seconds-long run of it that leaves its JSON and plot."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

from cellkern.train.config import save_config
from trainer_utils import tiny_config

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of the checkout, not an installed package
    sys.path.insert(0, str(ROOT))


def test_fit_slope_recovers_a_known_trend_within_its_interval():
    from benchmarks.soak import fit_slope

    rng = random.Random(0)
    ts = [i / 60 for i in range(240)]                       # 4 h, a sample a minute
    ys = [100.0 + 3.0 * t + rng.gauss(0, 2.0) for t in ts]
    f = fit_slope(ts, ys)
    assert f["slope_ci95"][0] < 3.0 < f["slope_ci95"][1]
    assert abs(f["residual_std"] - 2.0) < 0.3
    flat = fit_slope(ts, [5.0] * len(ts))
    assert flat["slope_per_hour"] == 0 and flat["residual_std"] == 0
    assert fit_slope([0, 1], [1, 2]) is None                # too few points for a noise estimate


def test_analysis_skips_the_warm_up():
    """Slopes over the samples after the warm-up (and after the first run) only."""
    from benchmarks.soak import analyse

    t0 = 1000.0
    samples = [dict(t=t0 + 60 * i, rss_bytes=(500 + 10 * i if i < 10 else 600) * 2**20, tensors=7 if i < 10 else 3,
                    tensor_bytes=0, fds=9) for i in range(60)]
    runs = [dict(t_end=t0 + 60 * i + 30, step_ms=10.0 + (i % 3)) for i in range(60)]
    state = dict(t_start=t0, settings=dict(warmup_minutes=10), samples=samples, after_run=samples, runs=runs)
    a = analyse(state)
    assert a["warmup_ends_s"] == 600
    for name in ("background", "after_run"):
        assert a[name]["rss_bytes"]["slope_per_hour"] == 0 and a[name]["rss_bytes"]["n"] == 50
        assert a[name]["tensors"]["first"] == a[name]["tensors"]["last"] == 3
    assert a["step_ms"]["runs"] == 50 and a["step_ms"]["median"] == 11.0


def test_a_short_soak_writes_its_results(tmp_path):
    save_config(tiny_config({"steps": 12}, eval_samples=20, cluster_every=12), tmp_path / "tiny.toml")
    out = tmp_path / "soak.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.soak", "--minutes", "0.5", "--config",
                           str(tmp_path / "tiny.toml"), "--out", str(out), "--interval", "0.5", "--save-every", "2",
                           "--threads", "1", "--warmup-minutes", "0"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["status"] == "completed" and len(d["runs"]) >= 1 and len(d["samples"]) >= 5
    assert d["git"]["commit"] and d["machine"]["cpu_model"]
    assert all(s["tensors"] is not None for s in d["samples"] + d["after_run"])   # counted in the main thread
    assert set(d["analysis"]) >= {"warmup_ends_s", "background", "after_run"}
    assert out.with_suffix(".png").is_file()
    assert "soak completed" in proc.stdout and "slope" in proc.stdout
