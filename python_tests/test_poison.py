"""The NaN-poisoning of kernel outputs that the suite runs under really
happens, so a kernel that skips an element cannot pass by luck."""
import torch

import cellkern as ck
from cellkern import backends

import pytest


def test_new_output_is_nan_when_poisoned():
    assert backends.outputs_poisoned()
    t = backends.new_output((3, 4), torch.float32, "cpu")
    assert torch.isnan(t).all()
    backends.poison_outputs(False)
    try:
        assert not backends.outputs_poisoned()
    finally:
        backends.poison_outputs(True)


@pytest.mark.skipif("cpu" not in ck.available_backends(), reason="cpu extension not built")
def test_cpu_kernels_allocate_poisoned_outputs():
    """The C++ kernels' allocation helper hands out NaN while poisoning is on,
    and a full op still writes every element (no NaN survives)."""
    ops = torch.ops.cellkern_cpu
    assert torch.isnan(ops.new_output([2, 3], torch.float32)).all()
    assert torch.isnan(ops.new_output([2, 3], torch.bfloat16)).all()
    backends.poison_outputs(False)
    try:
        assert not torch.isnan(ops.new_output([64], torch.float32)).all()
    finally:
        backends.poison_outputs(True)
    s = torch.randn(2, 1, 3, 1, 4)
    w = torch.zeros(26, 3, 1, 4)
    assert torch.isfinite(ck.ops.aggregate(s, w, boundary="zero", backend="cpu")).all()
