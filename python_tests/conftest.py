"""Shared fixtures: per-dtype tolerances, backend/device matrix, comparison helpers.

Triton runs interpreted on the CPU when no GPU exists (STYLE rule 9): the
variable must be set before triton is first imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import cellkern as ck  # noqa: E402
from cellkern import backends  # noqa: E402

if os.environ.get("CELLKERN_CUDA_EMULATION") == "1":
    # the CUDA kernels of csrc/cuda, compiled as host code, serve as the "cpu"
    # backend: every cpu case of the suite then checks them against the
    # reference (python_tests/test_cuda_emulation.py runs this)
    from cuda_emulation import emulated_backend  # noqa: E402

    try:  # the C++ CPU ops stay registered (test_poison checks them by name)
        from cellkern import _C  # noqa: E402,F401
    except ImportError:
        pass
    backends._modules["cpu"] = emulated_backend()

#: (rtol, atol) of a backend against the reference computed in float64
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 2e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}
LOW_PRECISION = (torch.float16, torch.bfloat16)


def fast_backends():
    """(backend, device) pairs to test against the reference."""
    out = []
    avail = ck.available_backends()
    if "cpu" in avail:
        out.append(("cpu", "cpu"))
    if "triton" in avail:
        out.append(("triton", "cuda" if torch.cuda.is_available() else "cpu"))
    if "cuda" in avail:
        out.append(("cuda", "cuda"))
    return out


def backend_params():
    return [pytest.param(b, d, id=f"{b}-{d}", marks=[pytest.mark.triton] if b == "triton" else [])
            for b, d in fast_backends()]


def all_backends():
    """The reference itself, then every fast backend."""
    return [pytest.param("reference", "cpu", id="reference-cpu")] + backend_params()


def copy_state(state, device):
    """A copy of a PlasticityState on ``device`` (``PlasticityState.to`` may share the tensors)."""
    return ck.PlasticityState(*(t.to(device, copy=True) for t in (state.x_pre, state.x_post, state.theta)))


def interpreted(backend: str, device: str) -> bool:
    return backend == "triton" and device == "cpu"


def skip_unsupported_dtype(backend: str, device: str, dtype: torch.dtype):
    if interpreted(backend, device) and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16 arithmetic: bf16 Triton cases run on a GPU")


def assert_matches_reference(out, ref_exact, ref_same_dtype=None, *, grad=False, name="out"):
    """``out`` against ``ref_exact`` (reference in fp64) with the dtype's tolerance.

    For fp16/bf16 the kernel's error must also be at most 2× (3× for
    gradients) the error of the reference run in that dtype (STYLE rule 7).
    """
    assert out.dtype == (ref_same_dtype.dtype if ref_same_dtype is not None else out.dtype)
    rtol, atol = TOL[out.dtype]
    got, want = out.double().cpu(), ref_exact.double().cpu()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    if out.dtype in LOW_PRECISION and ref_same_dtype is not None:
        factor = 3.0 if grad else 2.0
        err = (got - want).abs().max().item()
        ref_err = (ref_same_dtype.double().cpu() - want).abs().max().item()
        scale = want.abs().max().item()
        assert err <= factor * ref_err + 1e-3 * max(scale, 1.0), (
            f"{name}: error {err:.3g} > {factor}× reference's own {out.dtype} error {ref_err:.3g}")
    else:
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol * max(1.0, want.abs().max().item()),
                                   msg=lambda m: f"{name}: {m}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def no_backend_env(monkeypatch):
    monkeypatch.delenv("CELLKERN_BACKEND", raising=False)
    return monkeypatch


def pytest_report_header(config):
    cpu = backends._load("cpu")
    served = f" (cpu served by {cpu.__name__})" if cpu is not None and cpu.__name__ != f"{backends.__name__}.cpu" else ""
    return f"cellkern backends: {backends.backend_status()}{served}"


@pytest.fixture(autouse=True, scope="session")
def _poison_outputs():
    """Every kernel output starts as NaN (STYLE rule 8): an element a kernel
    forgets to write fails the comparison instead of passing as a fresh 0."""
    backends.poison_outputs(True)
    yield
    backends.poison_outputs(False)
