"""The package imports and serves every op even without its compiled extension."""
import subprocess
import sys
import textwrap

import cellkern as ck


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_import_without_extension_falls_back_to_reference():
    res = _run("""
        import sys, warnings
        sys.modules["cellkern._C"] = None          # as if the extension had failed to build
        import torch
        with warnings.catch_warnings(record=True) as caught:  # backends load (and warn) at import
            warnings.simplefilter("always")
            import cellkern as ck
            names = ck.available_backends()
        assert "cpu" not in names and "reference" in names, names
        assert any("C++ CPU extension did not load" in str(w.message) for w in caught)
        s = torch.randn(1, 2, 3, 3, 3); w = torch.rand(26, 3, 3, 3)
        out = ck.ops.propagate(s, w)                 # served by the reference
        assert out.shape == s.shape
        status = ck.backend_status()
        assert status["cpu"] != "available" and "cellkern._C" in status["cpu"], status
        print("ok", names)
    """)
    assert res.returncode == 0, res.stderr
    assert "ok" in res.stdout


def test_info_reports_backends():
    res = subprocess.run([sys.executable, "-m", "cellkern.info"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"cellkern {ck.__version__}" in res.stdout
    for name in ("reference", "cpu", "triton", "cuda"):
        assert name in res.stdout
