"""Shared benchmark harness: the machine, the copy roof, timing, and reporting.

Every suite (``benchmarks/<family>.py``) uses the same pieces:

- :func:`describe_machine` — CPU model, cores, torch threads, torch/triton/CUDA
  versions, GPU name, load average and date (no hostname);
- :func:`copy_roof` — the copy bandwidth of this device, measured in the same
  run: ``dst.copy_(src)`` on a buffer of at least 256 MiB, ``GB/s = 2·bytes/time``
  (one read plus one write per byte);
- :func:`measure` — the median time of a callable: on CPU
  ``torch.utils.benchmark.Timer(...).blocked_autorange(min_run_time=...)`` with
  torch's own thread count, on CUDA ``triton.testing.do_bench`` (median);
- :func:`format_table`, :func:`write_json` and :func:`plot` (PNG, only when
  matplotlib is importable) for the report.

The timers do all the measuring; nothing here runs its own timing loop.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: ``(rtol, atol)`` of the correctness gate, per dtype: a backend passes when
#: ``|out - ref| <= atol·max(1, max|ref|) + rtol·|ref|`` everywhere.
GATE_TOLERANCE = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (5e-3, 1e-3),
    torch.bfloat16: (3e-2, 1e-2),
}

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _triton_version():
    try:
        import triton
    except Exception:  # noqa: BLE001 - triton is optional; any import failure means "none"
        return None
    return triton.__version__


def _build_isa():
    """The vector ISA the C++ CPU extension was built for (cellkern.info.build_isa), or None."""
    try:
        from cellkern.info import build_isa
    except ImportError:
        return None
    return build_isa()


def describe_machine(device: torch.device) -> dict:
    """What the numbers were measured on (no hostname)."""
    device = torch.device(device)
    info = {
        "device": device.type,
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda_runtime": torch.version.cuda,
        "gpu": None,
        "gpu_memory_gib": None,
        # what the C++ kernels were compiled for (-march, widest vector unit, ISA macros)
        "cpu_build": _build_isa(),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def machine_busy(info: dict, own_threads: int = 0) -> bool:
    """True when other work loads the CPUs (timings are then unreliable:
    torch's OpenMP threads wait on one another when a core is taken).

    ``own_threads`` is the load this benchmark itself adds (its torch threads,
    when checked at the end of a run): only load beyond it counts.
    """
    load, cores = info.get("load_average_1min"), info.get("cpu_cores") or 1
    return load is not None and load - own_threads > 0.5 * cores


def device_slug(info: dict) -> str:
    """A file-name-safe name of the device: the GPU on CUDA, else the CPU, its
    cores and the vector ISA the C++ kernels were built for (``…-2c-avx2-fma``)."""
    if info["device"] == "cuda":
        name = info["gpu"]
    else:
        build = info.get("cpu_build") or {}
        name = f"{info['cpu_model']}-{info['cpu_cores']}c-{build.get('vector_isa') or 'no-ext'}"
    slug = re.sub(r"[^a-z0-9]+", "-", f"{info['device']}-{name}".lower()).strip("-")
    return slug or "unknown"


def measure(fn, device: torch.device, min_run_time: float) -> dict:
    """Median time of ``fn()`` in ms.

    CPU: ``blocked_autorange`` keeps measuring blocks until ``min_run_time``
    seconds are spent (after one sizing call that doubles as a warm-up), so a
    call of ``t`` seconds gets about ``min_run_time / t`` runs. CUDA:
    ``do_bench`` with ``rep = min_run_time``.

    Returns ``{"median_ms", "runs", "number_per_run", "iqr_ms"}`` (runs and iqr
    are None on CUDA, where do_bench reports only the median).
    """
    device = torch.device(device)
    if device.type == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(fn, warmup=max(1, int(min_run_time * 250)),
                                     rep=max(1, int(min_run_time * 1000)), return_mode="median")
        return {"median_ms": float(ms), "runs": None, "number_per_run": None, "iqr_ms": None}
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return {
        "median_ms": m.median * 1e3,
        "runs": len(m.times),
        "number_per_run": m.number_per_run,
        "iqr_ms": m.iqr * 1e3,
    }


def min_run_time_for(estimate_s: float, base: float, min_runs: int = 3, max_row_s: float = 20.0) -> float:
    """A ``min_run_time`` that gives at least ``min_runs`` runs of a call that
    takes about ``estimate_s`` seconds, unless that would exceed ``max_row_s``
    (then as many runs as fit, at least one)."""
    if estimate_s <= 0 or not math.isfinite(estimate_s):
        return base
    runs = min_runs if min_runs * estimate_s <= max_row_s else max(1, int(max_row_s // estimate_s))
    # blocked_autorange measures until min_run_time is spent: asking for runs·t
    # (the estimate is usually a cold call, so a little high) yields >= runs runs;
    # for a single run ask for less than one call.
    return max(base, runs * estimate_s if runs > 1 else 0.5 * estimate_s)


def call_once(call, device: torch.device) -> tuple:
    """``(call(), wall seconds)`` of one call, synchronised on CUDA. Used for the
    correctness gate and to size the measurement, never as a reported time."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    result = call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - t0


def gate(got, ref, dtype: torch.dtype, names=None) -> tuple:
    """Compare the tensors ``got`` with ``ref`` (sequences of equal length) within
    :data:`GATE_TOLERANCE` of ``dtype``.

    Returns ``(ok, {name: max abs error})``; a missing tensor, a shape or dtype
    mismatch or a non-finite value fails.
    """
    rtol, atol = GATE_TOLERANCE[dtype]
    names = names or [str(i) for i in range(len(ref))]
    ok, errs = True, {}
    for name, a, b in zip(names, got, ref):
        if a is None or a.shape != b.shape or a.dtype != b.dtype:
            errs[name] = float("nan")
            ok = False
            continue
        a64, b64 = a.detach().double(), b.detach().double()
        diff = (a64 - b64).abs()
        scale = max(1.0, b64.abs().max().item()) if b64.numel() else 1.0
        errs[name] = diff.max().item() if diff.numel() else 0.0
        ok = ok and bool(torch.isfinite(a64).all()) and bool((diff <= atol * scale + rtol * b64.abs()).all())
    return ok, errs


def add_speedups(rows: list, key) -> None:
    """Set ``speedup_eager`` and ``speedup_compile`` of every row: the median time
    of the ``reference`` (``compile``) row with the same ``key(row)`` over the
    row's own. Baselines count only when they ran and passed."""
    base = {}
    for r in rows:
        if r["backend"] in ("reference", "compile") and r["status"] in ("ref", "ok") and r["median_ms"]:
            base[(key(r), r["backend"])] = r["median_ms"]
    for r in rows:
        t = r["median_ms"] if r["status"] in ("ref", "ok", "FAIL") else None
        for name, col in (("reference", "speedup_eager"), ("compile", "speedup_compile")):
            ref_t = base.get((key(r), name))
            r[col] = ref_t / t if (ref_t and t) else None


def copy_roof(device: torch.device, nbytes: int = 256 * 2**20, min_run_time: float = 1.0, repeats: int = 5) -> dict:
    """Copy bandwidth of ``device``: ``dst.copy_(src)`` on two ``nbytes`` buffers.

    ``GB/s = 2·nbytes / time`` (each byte is read once and written once).
    The copy is measured ``repeats`` times and the roof is the fastest of
    those medians: shared cloud hosts swing between bandwidth levels, and the
    highest level seen is the honest (conservative) roof for the ratios.
    """
    device = torch.device(device)
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    samples = [measure(lambda: dst.copy_(src), device, min_run_time / repeats) for _ in range(repeats)]
    best = min(samples, key=lambda t: t["median_ms"])
    gbps = 2 * n * 4 / (best["median_ms"] * 1e-3) / 1e9
    del src, dst
    return {"op": "dst.copy_(src)", "bytes": n * 4, "gbps": gbps,
            "samples_gbps": [2 * n * 4 / (t["median_ms"] * 1e-3) / 1e9 for t in samples], **best}


def results_path(suite: str, info: dict, directory: Path = RESULTS_DIR) -> Path:
    """``<dir>/<suite>-<device-slug>-<YYYY-MM-DD>.json``; ``-2``, ``-3``… when taken."""
    date = info["date"][:10]
    base = f"{suite}-{device_slug(info)}-{date}"
    path = Path(directory) / f"{base}.json"
    k = 2
    while path.exists():
        path = Path(directory) / f"{base}-{k}.json"
        k += 1
    return path


def write_json(suite: str, payload: dict, info: dict, directory: Path = RESULTS_DIR) -> Path:
    """Write ``payload`` (which should hold the machine and the roof) and return the path."""
    path = results_path(suite, info, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=1, default=str)
        fh.write("\n")
    return path


def si(x, unit: str = "") -> str:
    """``1.23G`` style: three significant digits with an SI prefix; ``-`` for None."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g}{prefix}{unit}"
    return f"{x:.3g}{unit}"


def fmt_ms(x) -> str:
    """Milliseconds with three significant digits (at most four decimals)."""
    if x is None:
        return "-"
    digits = max(0, 2 - math.floor(math.log10(x))) if x > 0 else 3
    return f"{x:.{min(digits, 4)}f}"


def fmt_ratio(x) -> str:
    return "-" if x is None else f"{x:.3g}x"


def format_table(columns, rows, separators=()) -> str:
    """A fixed-width table. ``columns``: ``[(title, align)]`` with align ``<`` or
    ``>``; ``rows``: lists of strings; ``separators``: row indices before which
    a rule is drawn."""
    widths = [max(len(t), *(len(r[i]) for r in rows)) if rows else len(t) for i, (t, _) in enumerate(columns)]

    def line(cells):
        return "  ".join(f"{c:{a}{w}}" for c, (_, a), w in zip(cells, columns, widths)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [line([t for t, _ in columns]), rule]
    for i, r in enumerate(rows):
        if i in separators and i:
            out.append(rule)
        out.append(line(r))
    return "\n".join(out)


def format_machine(info: dict, roof: dict) -> str:
    dev = info["gpu"] if info["device"] == "cuda" else f"{info['cpu_model']}, {info['cpu_cores']} cores"
    build = info.get("cpu_build")
    if info["device"] != "cuda":
        dev += (f", kernels built -march={build['march']} ({build['vector_isa']})" if build
                else ", no C++ extension")
    lines = [
        f"device   {info['device']}: {dev} (torch threads {info['torch_threads']})",
        f"software torch {info['torch']}, triton {info['triton'] or '-'}, CUDA {info['cuda_runtime'] or '-'}, "
        f"python {info['python']}, {info['os']}",
        f"date     {info['date']}, load average {info['load_average_1min']}",
        f"roof     {roof['op']} on {roof['bytes'] / 2**20:.0f} MiB: {roof['gbps']:.1f} GB/s "
        f"({roof['median_ms']:.2f} ms)",
    ]
    return "\n".join(lines)


def plot(path: Path, title: str, series: dict, xlabels, ylabel: str) -> Path | None:
    """Grouped bar chart, one group per x label and one bar per series
    (``{name: [value or None per label]}``), saved as PNG beside the JSON.
    Returns the path, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    n = max(1, len(series))
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(xlabels) * n * 0.5 + 2), 4.5))
    for j, (name, values) in enumerate(series.items()):
        xs = [i + (j - (n - 1) / 2) * width for i in range(len(xlabels))]
        ax.bar(xs, [v if v is not None else float("nan") for v in values], width, label=name)
    ax.set_xticks(range(len(xlabels)))
    ax.set_xticklabels(xlabels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


#: comparison rows that are not cellkern kernels: their failures do not fail the run
NOT_CELLKERN = ("compile",)


def save_results(suite: str, payload: dict, info: dict, series: dict, labels: list, title: str, ylabel: str) -> None:
    """Write the JSON and the bar chart of one run, and say where they are."""
    path = write_json(suite, payload, info)
    print(f"\nwrote {path}")
    png = plot(path.with_suffix(".png"), f"{title} on {device_slug(info)}", series, labels, ylabel)
    if png:
        print(f"wrote {png}")


def exit_code(rows: list) -> int:
    """1 when any cellkern row failed its correctness gate or raised, else 0."""
    return int(any(r["backend"] not in NOT_CELLKERN and r["status"] in ("FAIL", "ERROR") for r in rows))



#: the ratio of the Triton backend's median to the CUDA backend's that issue 18 accepts on every row
TRITON_OVER_CUDA = 1.5


def acceptance(rows: list, roof_gbps: float, config, target) -> list:
    """Issue 18's acceptance figures of a run, from its rows and the roof measured in it.

    For every configuration ``config(row)`` (a hashable label) that has a
    ``cuda`` or ``triton`` row: each backend's share of the copy roof and,
    where ``target(row)`` gives one, the share it must reach; the Triton median
    over the CUDA median and :data:`TRITON_OVER_CUDA`. A row counts only when it
    passed its correctness gate (status ``ok``); otherwise its figures are None
    and the check is missed.

    Returns one dict per configuration: ``config``, ``roof_gbps``,
    ``{backend}_ms``, ``{backend}_roof_share``, ``roof_target``,
    ``roof_met``, ``triton_over_cuda``, ``ratio_met`` (None where the run has
    no such figure to judge).
    """
    out = {}
    for r in rows:
        if r["backend"] not in ("cuda", "triton"):
            continue
        key = config(r)
        item = out.setdefault(key, {"config": key, "roof_gbps": roof_gbps, "roof_target": None,
                                    "cuda_ms": None, "triton_ms": None,
                                    "cuda_roof_share": None, "triton_roof_share": None})
        ok = r["status"] == "ok" and r.get("median_ms")
        item[f"{r['backend']}_status"] = r["status"]
        if ok:
            item[f"{r['backend']}_ms"] = r["median_ms"]
            item[f"{r['backend']}_roof_share"] = r["gbps"] / roof_gbps if roof_gbps else None
        if r["backend"] == "cuda":
            item["roof_target"] = target(r)
    for item in out.values():
        share, want = item["cuda_roof_share"], item["roof_target"]
        item["roof_met"] = None if want is None else (share is not None and share >= want)
        c, t = item["cuda_ms"], item["triton_ms"]
        has_both = "cuda_status" in item and "triton_status" in item
        item["triton_over_cuda"] = t / c if (c and t) else None
        item["ratio_met"] = (item["triton_over_cuda"] is not None and item["triton_over_cuda"] <= TRITON_OVER_CUDA) \
            if has_both else None
    return list(out.values())


def format_acceptance(items: list) -> str:
    """The acceptance figures as lines (empty when the run had no cuda or triton row)."""
    if not items:
        return ""

    def pct(x):
        return "-" if x is None else f"{100 * x:.0f}%"

    def verdict(met):
        return "" if met is None else (" met" if met else " MISSED")

    lines = [f"acceptance (issue 18), copy roof {items[0]['roof_gbps']:.0f} GB/s measured in this run:"]
    for it in items:
        cuda = f"cuda {_ms_text(it['cuda_ms'])} = {pct(it['cuda_roof_share'])} of the roof"
        if it["roof_target"] is not None:
            cuda += f" (target >= {pct(it['roof_target'])}{verdict(it['roof_met'])})"
        triton = f"triton {_ms_text(it['triton_ms'])} = {pct(it['triton_roof_share'])}"
        if it["triton_over_cuda"] is not None or it["ratio_met"] is not None:
            ratio = "-" if it["triton_over_cuda"] is None else f"{it['triton_over_cuda']:.2f}x"
            triton += f", {ratio} cuda (target <= {TRITON_OVER_CUDA}x{verdict(it['ratio_met'])})"
        lines.append(f"  {it['config']}: {cuda}; {triton}")
    return "\n".join(lines)


def _ms_text(x) -> str:
    return "-" if x is None else f"{fmt_ms(x)} ms"
