"""Search the plasticity settings with the quality benchmark (selection on validation only).

    python -m benchmarks.quality_search PLAN.txt [--jsonl benchmarks/results/quality-search.jsonl]
    python -m benchmarks.quality_search --table      # rewrite quality-search.md from the JSONL

A plan holds one trial a line: ``name | data | seeds | labels | key=value ...`` (``seeds`` as
``0-2`` or ``0,3,5``; ``labels`` 300 or all; ``#`` starts a comment). Every trial runs
:func:`benchmarks.quality.evaluate` in ``val`` mode (plasticity and readout on the training
split minus a validation set, scored on that validation set; the test split is never
touched), appends one JSON line, and skips trials already in the JSONL (same name, data,
seeds, labels, config). ``--table`` writes ``benchmarks/results/quality-search.md`` (with the
findings of ``quality-search-notes.md`` above the table, when that file exists).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.quality import QualityConfig, evaluate, load_data

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_JSONL = RESULTS / "quality-search.jsonl"


def parse_seeds(text: str) -> list:
    text = text.strip()
    if "-" in text and "," not in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(t) for t in text.split(",")]


def parse_plan(path: str) -> list:
    trials = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = [p.strip() for p in line.split("|")]
        if len(parts) != 5:
            raise ValueError(f"quality_search: a plan line needs 5 fields separated by '|', got {line!r}")
        name, data, seeds, labels, items = parts
        trials.append({"name": name, "data": data, "seeds": parse_seeds(seeds), "labels": labels,
                       "items": items.split()})
    return trials


def key_of(t: dict) -> str:
    return json.dumps([t["name"], t["data"], t["seeds"], t["labels"], sorted(t["items"])])


def run_plan(plan: str, jsonl: Path) -> None:
    done = set()
    if jsonl.exists():
        for line in jsonl.read_text(encoding="utf-8").splitlines():
            if line.strip():
                done.add(json.loads(line)["key"])
    cache = {}
    for t in parse_plan(plan):
        k = key_of(t)
        if k in done:
            continue
        if t["data"] not in cache:
            cache[t["data"]] = load_data(t["data"])
        X, y, tag = cache[t["data"]]
        cfg = QualityConfig.from_items(t["items"])
        labels = 300 if t["labels"] == "300" else "all"
        t0 = time.time()
        try:
            res = evaluate(X, y, cfg, t["seeds"], labels, "val")
            s = res["summary"]
            rec = {"key": k, "name": t["name"], "data": tag, "labels": t["labels"], "seeds": t["seeds"],
                   "items": t["items"], "config": cfg.as_dict(), "summary": s,
                   "seconds": round(time.time() - t0, 1), "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
            d = s["trained_minus_twin"]
            print(f"{t['name']:<28} {tag:<12} n={len(t['seeds'])} trained {100*s['trained']['mean']:.2f} "
                  f"twin {100*s['twin']['mean']:.2f} raw {100*s['raw_pixels']['mean']:.2f} "
                  f"rand {100*s['random_features']['mean']:.2f} diff {100*d['mean']:+.2f} "
                  f"[{100*d['ci95'][0]:+.2f},{100*d['ci95'][1]:+.2f}] cos {s['diagnostics']['unit_cosine']:.2f} "
                  f"{rec['seconds']}s", flush=True)
        except Exception as e:  # noqa: BLE001 - a failed trial is recorded, the search goes on
            rec = {"key": k, "name": t["name"], "data": tag, "labels": t["labels"], "seeds": t["seeds"],
                   "items": t["items"], "error": f"{type(e).__name__}: {e}"}
            print(f"{t['name']:<28} {tag:<12} ERROR {rec['error']}", flush=True)
        with open(jsonl, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")


def write_table(jsonl: Path, out: Path) -> None:
    recs = [json.loads(l) for l in jsonl.read_text(encoding="utf-8").splitlines() if l.strip()]
    lines = [
        "# Quality search: what learns? (validation split only)",
        "",
        "Every row: `python -m benchmarks.quality_search` trial, validation mode (plasticity on the",
        "training split minus a 30% validation set, readout on 300 labels of it unless `labels` says",
        "`all`, scored on the validation set; the test split is never used here). Accuracies in %,",
        "mean over the seeds; `diff` = paired trained − twin, mean and 95% t-interval. `cos` = mean",
        "pairwise cosine of a cell's units after training (1 = all units alike); `dW` = |W − W0|/|W0|.",
        "Settings not named are configuration B of `research/learning.md` (the dataclass defaults of",
        "`benchmarks/quality.py`, `--preset B`): C=8, D=2, stencil ff (dz=−1, 3×3), zero boundary,",
        "α=1, steps=D, triangle, gain 1, τ=1, η=0.05, η_β=0, average wins, rate const, one update per",
        "presentation, 3 epochs (per layer, layerwise), batch 32, no augmentation, face read, no pool.",
        "Data: `digits` (sklearn), `digits-hard` and `textures` (made offline from files that ship",
        "with scikit-learn and matplotlib; see `benchmarks/quality.py`). Seeds 0–4 share splits and",
        "initial weights across rows, so rows on the same seeds are paired with each other too.",
        "",
        "| # | trial | data | labels | seeds | settings | trained | twin | raw | random | diff [95% CI] | cos | dW |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(recs, 1):
        seeds = f"{r['seeds'][0]}–{r['seeds'][-1]}" if len(r["seeds"]) > 1 else str(r["seeds"][0])
        items = " ".join(r["items"]) or "(defaults)"
        if "error" in r:
            lines.append(f"| {i} | {r['name']} | {r['data']} | {r['labels']} | {seeds} | {items} | error: {r['error']} |||||||")
            continue
        s = r["summary"]
        d = s["trained_minus_twin"]
        g = s.get("diagnostics", {})
        lines.append(
            f"| {i} | {r['name']} | {r['data']} | {r['labels']} | {seeds} | {items} | {100*s['trained']['mean']:.2f} | "
            f"{100*s['twin']['mean']:.2f} | {100*s['raw_pixels']['mean']:.2f} | {100*s['random_features']['mean']:.2f} | "
            f"{100*d['mean']:+.2f} [{100*d['ci95'][0]:+.2f}, {100*d['ci95'][1]:+.2f}] | "
            f"{g.get('unit_cosine', float('nan')):.2f} | {g.get('dW_rel', float('nan')):.2f} |")
    notes = out.with_name(out.stem + "-notes.md")
    if notes.exists():  # the hand-written findings, kept above the table when it is rewritten
        cut = next(i for i, l in enumerate(lines) if l.startswith("| # |"))
        lines = lines[:cut] + [notes.read_text(encoding="utf-8").rstrip(), "", "## All trials", ""] + lines[cut:]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("plan", nargs="?")
    ap.add_argument("--jsonl", default=str(DEFAULT_JSONL))
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    jsonl = Path(args.jsonl)
    if args.plan:
        run_plan(args.plan, jsonl)
    if args.table or args.plan:
        if jsonl.exists():
            write_table(jsonl, jsonl.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
