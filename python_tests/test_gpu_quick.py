"""tools/gpu_quick.sh without a GPU: its syntax, its steps and budgets (DRY_RUN=1),
and its plumbing run through with a stand-in python (steps, timeouts, summary, packing)."""
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_quick.sh"
STEPS = ("build", "propagate", "plasticity", "largest", "tests", "run", "ptxas")
needs_tools = pytest.mark.skipif(not (shutil.which("bash") and shutil.which("timeout") and shutil.which("tar")),
                                 reason="needs bash, timeout and tar")


def _run(out, env_extra, timeout=120):
    env = {**os.environ, **env_extra}
    return subprocess.run(["bash", str(SCRIPT), str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@needs_tools
def test_syntax_and_dry_run_fit_the_lease(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    res = _run(tmp_path / "out", {"DRY_RUN": "1"})
    assert res.returncode == 0, res.stderr
    budgets = dict(re.findall(r"^step (\w+)\s+budget\s+(\d+)s", res.stdout, re.M))
    assert tuple(budgets) == STEPS
    longest = int(re.search(r"longest path (\d+)s", res.stdout).group(1))
    assert longest <= 8 * 60 - 30, "the script fits under 8 device-minutes with room for its own overhead"
    assert longest == sum(int(budgets[s]) for s in ("build", "propagate", "plasticity", "largest", "tests"))
    assert "TORCH_CUDA_ARCH_LIST=9.0" in res.stdout and "CELLKERN_BUILD_ONLY=cuda" in res.stdout
    assert "cellkern.train.cli run --device cuda" in res.stdout and "benchmarks.largest --device cuda" in res.stdout
    assert not (tmp_path / "out").exists(), "a dry run writes nothing"


@needs_tools
def test_a_build_without_time_stops_the_check(tmp_path):
    res = _run(tmp_path / "out", {"PY": "/bin/true", "GPU_QUICK_BUDGET": "100", "GPU_QUICK_BUDGET_tests": "300"})
    assert res.returncode == 1 and "build skipped" in res.stdout and "nothing else runs" in res.stdout


FAKE_PY = """#!/bin/bash
case "$*" in
  "-m benchmarks."*) echo "size DxHxW  fake table of $2";;
  "-m cellkern.train.cli"*) mkdir -p "${@: -2:1}"; echo ckpt > "${@: -2:1}/checkpoint.pt"; echo "| stage | fake |";;
  "-m pytest"*) echo "3 failed, 9 passed"; exit 1;;
  "tools/ptxas_report.py"*) sleep 60;;
esac
exit 0
"""


@needs_tools
def test_steps_run_time_out_and_pack(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PY)
    fake.chmod(0o755)
    out = tmp_path / "out"
    budgets = {f"GPU_QUICK_BUDGET_{s}": "2" for s in STEPS}
    res = _run(out, {"PY": str(fake), "GPU_QUICK_BUDGET": "18", **budgets})
    assert res.returncode == 1, "a failing step fails the check"
    summary = (out / "summary.txt").read_text()
    for step in ("build: ok", "propagate: ok", "plasticity: ok", "largest: ok", "run: ok"):
        assert step in summary, summary
    assert "tests: FAILED (exit 1)" in summary and "3 failed, 9 passed" in summary
    assert "ptxas: TIMEOUT" in summary, "a step stops at what is left of the budget"
    assert re.search(r"build \(timeout 1[0-2]s\)", res.stdout), "the first step gets the whole less the later budgets"
    assert "fake table of benchmarks.largest" in summary and "| stage | fake |" in summary
    assert sorted(p.name for p in out.iterdir()) == ["results.tgz", "summary.txt"], "two files come back"
    with tarfile.open(out / "results.tgz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {f"{s}.log" for s in STEPS} <= names and "checkpoint.pt" not in names
