"""The README is true: every Python block in it runs, its examples do what the
text says, and no git-tracked file holds merge-conflict markers.

The two checkers, :func:`conflict_markers` / :func:`tracked_conflicts` and
:func:`broken_blocks`, are plain functions so that the tests at the bottom can
show that each one fails on a planted fault (without touching the real files).
"""
import json
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_MARKER = re.compile(r"^(?:<{7} |={7}$|>{7} )", re.M)


def python_blocks(text: str) -> list:
    """``[(line, code)]`` of every ```` ```python ```` block of a Markdown text
    (``line``: the 1-based line of the block's first code line)."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _BLOCK.finditer(text)]


def conflict_markers(text: str) -> list:
    """``[(line, marker line)]`` of the merge-conflict markers in a text: lines
    starting with seven ``<`` or ``>`` and a space, or exactly seven ``=``."""
    return [(text.count("\n", 0, m.start()) + 1, text[m.start():].split("\n", 1)[0])
            for m in _MARKER.finditer(text)]


def tracked_conflicts(root) -> list:
    """``["path:line: marker"]`` for every git-tracked text file under ``root``
    (binary files, those with a NUL byte, are skipped; so are tracked files
    deleted from the work tree)."""
    root = pathlib.Path(root)
    names = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    found = []
    for name in filter(None, names.decode().split("\0")):
        path = root / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        found += [f"{name}:{line}: {marker}" for line, marker in conflict_markers(data.decode("utf-8", "replace"))]
    return found


# Runs in a fresh interpreter: each block in its own namespace, compiled with
# the README's line numbers; os._exit skips the interpreter teardown, which can
# abort a process that held a gloo process group.
_RUNNER = r"""
import json, os, sys, traceback
results = []
for line, code in json.load(sys.stdin):
    try:
        exec(compile("\n" * (line - 1) + code, "README.md", "exec"), {"__name__": "__readme__"})
    except BaseException as exc:
        tb = traceback.extract_tb(exc.__traceback__)
        where = [f.lineno for f in tb if f.filename == "README.md"] or [getattr(exc, "lineno", line)]
        results.append([line, where[-1], "".join(traceback.format_exception_only(type(exc), exc)).strip()])
sys.stdout.write("\nREADME-RESULT " + json.dumps(results) + "\n")
sys.stdout.flush()
os._exit(0)
"""


def broken_blocks(text: str, timeout: float = 600) -> list:
    """``[(block line, failing line, error)]`` of the Python blocks of ``text``
    that raise, each run in a fresh namespace of one child interpreter started in
    the repository root (so it imports this checkout's ``cellkern``)."""
    proc = subprocess.run([sys.executable, "-c", _RUNNER], input=json.dumps(python_blocks(text)), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if "README-RESULT " not in proc.stdout:
        return [(0, 0, f"the block runner died (exit {proc.returncode}): {proc.stderr[-3000:]}")]
    return [tuple(r) for r in json.loads(proc.stdout.rsplit("README-RESULT ", 1)[1])]


def _block(needle: str) -> str:
    return next(code for _, code in python_blocks(README.read_text()) if needle in code)


def _run(code: str) -> dict:
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    return ns


# -- the real README and tree -------------------------------------------------------------


def test_no_conflict_markers_in_tracked_files():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    found = tracked_conflicts(ROOT)
    assert found == [], "merge-conflict markers in tracked files:\n" + "\n".join(found)


def test_every_readme_python_block_runs():
    text = README.read_text()
    assert len(python_blocks(text)) >= 6, "the README shows the library by example"
    broken = broken_blocks(text)
    assert broken == [], "README Python blocks that fail:\n" + "\n".join(
        f"block at line {b}, failing at line {at}: {err}" for b, at, err in broken)


def test_readme_model_example_backpropagates_to_the_lattice():
    ns = _run(_block("class LatticeClassifier"))
    model = ns["LatticeClassifier"]()
    logits = model(torch.rand(3, 1, 16, 16))
    assert logits.shape == (3, 10)
    assert model.w.grad is None
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 2, 3])).backward()
    assert model.w.grad is not None and model.w.grad.abs().sum() > 0


def test_readme_layer_example_learns_both_ways():
    ns = _run(_block("Lattice3d("))
    layer = ns["layer"]
    assert layer.w.grad is not None and layer.w.grad.abs().sum() > 0
    assert layer.x_pre.abs().sum() > 0, "plasticity_step should have run the rules (traces)"


def test_readme_plasticity_example_moves_the_weights_within_bounds():
    ns = _run(_block("plasticity_step_(w, y"))
    w = ns["w"]
    assert (w != 0.5).any(), "the plasticity example should move some weights"
    assert bool(((w >= 0.1) & (w <= 2.0)).all())


def test_readme_pruning_counts_are_what_the_comments_say():
    ns = _run(_block("SparseWeights"))
    assert (ns["mask"].sum(0) == 8).all() and (ns["again"].sum(0) == 2).all()
    border = ns["border"].sum(0)
    assert (border[[0, -1]] == 5).all() and (border[1:-1] == 8).all()
    assert ns["sw"].Kmax == 8 and ns["sw"].nbytes == 24 * 16 ** 3


def test_readme_memory_figures_are_what_the_comments_say():
    ns = _run(_block("fit_dims"))
    assert ns["best"] == (666, 666, 333)
    assert round(ns["dense"], 2) == 1.76
    assert round(ns["sparse"], 2) == 2.99


def test_readme_config_example_loads():
    from cellkern.train.config import config_from_dict

    tomllib = pytest.importorskip("tomllib")
    block = re.search(r"^```toml\n(.*?)^```", README.read_text(), re.S | re.M).group(1)
    cfg = config_from_dict(tomllib.loads(block))
    assert cfg.checkpoint_every == 200 and cfg.stages[0].dims == (16, 16, 16)


def test_readme_stage_and_profile_tables_are_the_code():
    from cellkern.train.config import PROFILE_TABLE, default_stages

    text = README.read_text()
    for st in default_stages():
        row = (f"| {st.name} | {tuple(st.dims)} | {st.steps} | {st.plasticity_profile} | "
               f"{'yes' if st.clustering_enabled else 'no'} | {st.sparse_keep} |")
        assert row in text, f"README stage table: expected the row {row!r}"
    for p in PROFILE_TABLE.values():
        lr = f"{p.lr_multiplier}" if p.lr_multiplier else "0 (no plasticity step runs)"
        row = f"| {p.name} | {lr} | {p.activity_threshold} | {p.competition} | {p.tau_theta:g} |"
        assert row in text, f"README profile table: expected the row {row!r}"


# -- the checkers fail on planted faults ----------------------------------------------------


def test_marker_check_finds_planted_markers():
    lt, eq, gt = "<" * 7, "=" * 7, ">" * 7
    text = f"a\n{lt} HEAD\nours\n{eq}\ntheirs\n{gt} run\nb {eq}\n{eq}=\n"
    assert conflict_markers(text) == [(2, f"{lt} HEAD"), (4, eq), (6, f"{gt} run")]
    assert conflict_markers("ok\n" + "-" * 7 + "\n" + eq + "=\n") == []


def test_tracked_file_check_finds_a_planted_marker(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    lt = "<" * 7
    (tmp_path / "clean.md").write_text("nothing here\n")
    (tmp_path / "notes.md").write_text(f"line\n{lt} HEAD\n")
    (tmp_path / "blob.bin").write_bytes(f"\0{lt} HEAD\n".encode())      # binary: skipped
    (tmp_path / "untracked.md").write_text(f"{lt} HEAD\n")               # not tracked: skipped
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "add", "clean.md", "notes.md", "blob.bin"], cwd=tmp_path, check=True)
    assert tracked_conflicts(tmp_path) == [f"notes.md:2: {lt} HEAD"]


def test_block_check_reports_a_broken_block():
    text = ("# demo\n\n```python\nx = 1\n```\n\n```python\nimport math\n\nmath.sqrt(-x)\n```\n\n"
            "```bash\nexit 1\n```\n\n```python\ndef f(:\n```\n")
    assert [line for line, _ in python_blocks(text)] == [4, 8, 18]
    got = broken_blocks(text)
    assert [(b, at) for b, at, _ in got] == [(8, 10), (18, 18)], got
    assert got[0][2] == "NameError: name 'x' is not defined"    # each block runs in a fresh namespace
    assert "SyntaxError" in got[1][2]
