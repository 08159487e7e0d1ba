"""Registers, spills and shared memory of every CUDA kernel, from ``ptxas -v``.

Compiles each ``csrc/cuda/*.cu`` file with the flags of setup.py plus
``-Xptxas -v`` for the given architectures (no GPU needed), and prints one row
per kernel instantiation: registers per thread, stack frame, spill stores and
loads (bytes per thread), static shared memory, and the occupancy the
registers allow at 256 threads a block (warps resident per SM / 64).

    python tools/ptxas_report.py                       # sm_90, every kernel
    python tools/ptxas_report.py --arch 80 90 -k synapse_kernel
    python tools/ptxas_report.py --json out.json       # also the rows as JSON
    python tools/ptxas_report.py --check-spills 'synapse_kernel<.*26>'
        # exit 1 when a kernel matching the pattern spills

Compiles run side by side (one process per file and architecture).
"""
import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
THREADS = 256  # common.cuh kThreads

_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def nvcc_path():
    for home in filter(None, (os.environ.get("CUDA_HOME"), "/usr/local/cuda")):
        path = os.path.join(home, "bin", "nvcc")
        if os.path.exists(path):
            return path
    return shutil.which("nvcc")


def demangle(names):
    """Readable kernel names: c++filt, without the namespaces and the argument list."""
    if shutil.which("c++filt") is None:
        return list(names)
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    short = []
    for name in out[: len(names)]:
        name = re.sub(r"cellkern::cuda::\(anonymous namespace\)::", "", name)
        name = re.sub(r"^void ", "", name)
        depth, cut = 0, len(name)
        for i, ch in enumerate(name):  # drop the argument list: the first '(' at template depth 0
            depth += ch == "<"
            depth -= ch == ">"
            if ch == "(" and depth == 0:
                cut = i
                break
        short.append(name[:cut].replace("__nv_bfloat16", "bf16").replace("__half", "fp16"))
    return short


def parse(log):
    """Rows (mangled name, arch, registers, stack, spill stores, spill loads, smem) of a ptxas -v log."""
    rows, cur = [], None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = {"mangled": m.group(1), "arch": m.group(2), "registers": 0, "stack": 0, "spill_stores": 0,
                   "spill_loads": 0, "smem": 0}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = _FRAME.search(line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        m = _USED.search(line)
        if m:
            cur["registers"] = int(m.group(1))
            s = _SMEM.search(line)
            cur["smem"] = int(s.group(1)) if s else 0
    return rows


def occupancy(registers, threads=THREADS):
    """Resident warps per SM / 64 from registers alone (64K registers, 2048
    threads, 256-register allocation units per warp; sm_80 and sm_90)."""
    if registers == 0:
        return 1.0
    per_warp = -(-registers * 32 // 256) * 256
    warps_per_block = threads // 32
    blocks = min(65536 // (per_warp * warps_per_block), 2048 // threads, 32)
    return blocks * warps_per_block / 64


def compile_all(files, archs, extra):
    nvcc = nvcc_path()
    if nvcc is None:
        sys.exit("ptxas_report: nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    tmp = tempfile.mkdtemp(prefix="ptxas_report")
    procs = []
    for src in files:
        for arch in archs:
            out = os.path.join(tmp, f"{os.path.basename(src)}.{arch}.o")
            cmd = [nvcc, "-c", src, "-o", out, "-O3", "-std=c++17", "-Xcompiler", "-fPIC", f"-I{CSRC}",
                   f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", *extra]
            procs.append((src, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    rows = []
    for src, proc in procs:
        log, _ = proc.communicate()
        if proc.returncode != 0:
            sys.exit(f"ptxas_report: {os.path.basename(src)} failed:\n{log[-4000:]}")
        for r in parse(log):
            r["file"] = os.path.basename(src)
            rows.append(r)
    shutil.rmtree(tmp, ignore_errors=True)
    for r, name in zip(rows, demangle([r["mangled"] for r in rows])):
        r["kernel"] = name
        r["occupancy"] = occupancy(r["registers"])
    return sorted(rows, key=lambda r: (r["file"], r["kernel"], r["arch"]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", nargs="+", default=["90"], help="compute capabilities, e.g. 80 90 (default 90)")
    ap.add_argument("-k", "--kernel", default="", help="only kernels whose name matches this regex")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--check-spills", metavar="REGEX", help="exit 1 when a kernel matching REGEX spills")
    ap.add_argument("--nvcc-flag", action="append", default=[], help="an extra nvcc flag (repeatable)")
    ap.add_argument("files", nargs="*", help="the .cu files (default csrc/cuda/*.cu)")
    args = ap.parse_args(argv)
    files = args.files or sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    rows = [r for r in compile_all(files, args.arch, args.nvcc_flag) if re.search(args.kernel, r["kernel"])]
    width = max([len(r["kernel"]) for r in rows] + [6])
    print(f"{'kernel':<{width}}  arch   regs  stack  spill-st  spill-ld  smem  occ@{THREADS}")
    for r in rows:
        print(f"{r['kernel']:<{width}}  {r['arch']:<5}  {r['registers']:>4}  {r['stack']:>5}  {r['spill_stores']:>8}"
              f"  {r['spill_loads']:>8}  {r['smem']:>4}  {r['occupancy']:>7.0%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.check_spills:
        bad = [r for r in rows if re.search(args.check_spills, r["kernel"]) and (r["spill_stores"] or r["spill_loads"])]
        for r in bad:
            print(f"SPILLS: {r['kernel']} {r['arch']}: {r['spill_stores']} B stored, {r['spill_loads']} B loaded")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
