"""Gradient checkpointing of ``propagate_steps``: the same gradients as the
plain unroll, a real recomputation, and activation memory ~ T/k + k states
instead of T (counted with benchmarks.live_bytes.LiveBytes)."""
import sys
from pathlib import Path

import pytest
import torch

import cellkern as ck
from cellkern import backends
from cellkern import sparse as S

from conftest import all_backends, assert_matches_reference, interpreted

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of the checkout, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.live_bytes import LiveBytes  # noqa: E402


def _inputs(dims=(4, 5, 6), B=2, C=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(B, C, *dims, generator=g, dtype=dtype)
    w = torch.rand(26, *dims, generator=g, dtype=dtype) * 0.1
    x = torch.randn(B, C, *dims, generator=g, dtype=dtype) * 0.1
    return s, w, x


@pytest.mark.parametrize("form", ["dense", "ell"])
@pytest.mark.parametrize("k", [1, 3, 7, 20])
@pytest.mark.parametrize("backend, device", all_backends())
def test_checkpointing_gives_the_plain_gradients(backend, device, k, form):
    slow = interpreted(backend, device)
    if slow and k not in (1, 3):
        pytest.skip("interpreted Triton: two segment lengths")
    dt = torch.float32 if backend == "triton" else torch.float64
    s, w, x = (t.to(device, dt) for t in _inputs((2, 3, 4) if slow else (4, 5, 6)))
    mask = S.prune(w, keep=0.5)
    T = 4 if slow else 7

    def grads(every):
        sg, wg, xg = (t.clone().requires_grad_() for t in (s, w, x))
        if form == "ell":
            w_ell, idx = S.to_ell(wg, mask)
            wf, mf = w_ell, idx
        else:
            wf, mf = wg, mask
        out = ck.ops.propagate_steps(sg, wf, T, mf, x=xg, leak=0.4, boundary="zero", checkpoint_every=every,
                                     backend=backend)
        return (out, *torch.autograd.grad(out, (sg, wg, xg), torch.ones_like(out)))

    plain = grads(None)
    ckpt = grads(k)
    for name, a, b in zip(("out", "ds", "dw", "dx"), ckpt, plain):
        assert_matches_reference(a, b.detach(), name=name)


def test_checkpointing_recomputes(monkeypatch):
    """Backward of a checkpointed unroll runs every forward step again."""
    calls = []
    ref = backends.reference
    real = ref.propagate_forward
    monkeypatch.setattr(ref, "propagate_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    s, w, _ = _inputs()
    for every, want in ((None, 6), (2, 12), (6, 12)):
        calls.clear()
        sg = s.clone().requires_grad_()
        out = ck.ops.propagate_steps(sg, w, 6, checkpoint_every=every, backend="reference")
        out.sum().backward()
        assert len(calls) == want, (every, len(calls))


def _peak(T, every, dims=(10, 10, 10), B=2, C=2):
    s, w, _ = _inputs(dims, B, C, torch.float32)
    sg = s.clone().requires_grad_()
    with LiveBytes() as m:
        out = ck.ops.propagate_steps(sg, w, T, checkpoint_every=every, leak=0.5, backend="reference")
        out.sum().backward()
        del out
    return m.peak / s.nbytes  # in states


def test_checkpointing_memory_grows_like_t_over_k_plus_k():
    plain = {T: _peak(T, None) for T in (8, 16, 32)}
    k4 = {T: _peak(T, 4) for T in (8, 16, 32)}
    # plain: every step keeps its state and pre-activation (≥ 2 states per step)
    assert plain[32] - plain[16] >= 2 * 16 * 0.9
    # checkpointed: one state per k steps, plus one segment of k steps during backward
    assert k4[32] - k4[16] <= (16 / 4) * 1.5 + 1
    assert k4[32] < plain[32] / 3
    # the k term: a longer segment costs more at fixed T
    assert _peak(32, 16) > _peak(32, 4)
