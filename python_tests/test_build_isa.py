"""The build switch CELLKERN_MARCH and the ISA record of the C++ extension.

The extension records the -march it was built for and the compiler's ISA
macros (cellkern._C.MARCH / VECTOR_ISA / ISA_MACROS); ``python -m
cellkern.info`` prints them and the benchmarks' machine description carries
them into the result file names.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cellkern.info as info

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import harness  # noqa: E402

#: runs setup.py's definitions (not its setup() call) and prints _march()
PROBE = ("src = open('setup.py').read(); ns = {'__file__': 'setup.py', '__name__': 'probe'};"
         "exec(src[:src.rindex('\\nsetup(')], ns); print(ns['_march']())")


def test_build_isa_agrees_with_its_macros():
    isa = info.build_isa()
    if isa is None:
        pytest.skip("the C++ extension is not built")
    macros, word = isa["macros"], isa["vector_isa"]
    assert isa["march"] not in (None, "unrecorded"), "the build did not record its -march (setup.py -DCELLKERN_MARCH)"
    if "__AVX512F__" in macros:
        assert word == "avx512"
    elif "__AVX2__" in macros:
        assert word == ("avx2-fma" if "__FMA__" in macros else "avx2")
    elif "__ARM_NEON" in macros:
        assert word in ("neon", "sve")
    # the record must say what this very process's kernels were compiled for:
    # an extension built for an ISA the CPU lacks would not have loaded
    if sys.platform == "linux" and os.path.exists("/proc/cpuinfo"):
        flags = set()
        for line in open("/proc/cpuinfo"):
            if line.startswith(("flags", "Features")):
                flags |= set(line.split(":", 1)[1].split())
        for macro, flag in (("__AVX512F__", "avx512f"), ("__AVX2__", "avx2"), ("__FMA__", "fma")):
            if macro in macros and flags:
                assert flag in flags, f"built with {macro} on a CPU without {flag}"


def test_info_prints_the_isa():
    out = subprocess.run([sys.executable, "-m", "cellkern.info"], capture_output=True, text=True, cwd=ROOT,
                         check=True).stdout
    isa = info.build_isa()
    if isa is None:
        assert "cpu extension: not built" in out
    else:
        assert f"-march={isa['march']}, vector ISA {isa['vector_isa']}" in out


def test_benchmark_file_names_carry_the_isa(tmp_path):
    machine = harness.describe_machine("cpu")
    assert machine["cpu_build"] == info.build_isa()
    fake = dict(machine, cpu_build={"march": "x86-64-v3", "vector_isa": "avx2-fma", "macros": ["__AVX2__"]})
    assert harness.device_slug(fake).endswith("-avx2-fma")
    assert harness.results_path("plasticity", fake, tmp_path).name.startswith(
        "plasticity-" + harness.device_slug(fake))
    assert "-march=x86-64-v3 (avx2-fma)" in harness.format_machine(
        fake, {"op": "copy", "bytes": 2**20, "gbps": 1.0, "median_ms": 1.0})
    none = dict(machine, cpu_build=None)
    assert harness.device_slug(none).endswith("-no-ext")


@pytest.mark.parametrize("env, march", [
    ({}, "native"),
    ({"CELLKERN_MARCH": "x86-64-v3"}, "x86-64-v3"),
    ({"CELLKERN_MARCH": "none"}, "none"),
    ({"CELLKERN_NATIVE": "0"}, "none"),
])
def test_setup_march_switch(env, march):
    """setup.py's _march(): the switch picks the -march (read without building)."""
    env_all = {k: v for k, v in os.environ.items() if k not in ("CELLKERN_MARCH", "CELLKERN_NATIVE")}
    env_all.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, env=env_all)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == march


def test_setup_march_switch_rejects_nonsense():
    env = dict(os.environ, CELLKERN_MARCH="native; rm -rf /")
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode != 0 and "CELLKERN_MARCH must be an architecture name" in out.stderr
