"""Two gloo processes on localhost: data parallel and domain decomposition equal one process."""
import sys

import pytest
import torch
import torch.distributed as dist

import cellkern as ck
from cellkern import distributed as ckd
from dist_utils import WORLD, spawn

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


RULE = ck.PlasticityRule(stdp=ck.STDP(lr=0.5), bcm=ck.BCM(lr=0.5, tau_theta=5.0), competition=ck.Competition(0.3),
                         activity_threshold=0.2, w_min=0.0, w_max=1.0)


def _dp_exact(rank):
    g = torch.Generator().manual_seed(1)
    dims, B = (5, 6, 7), 3
    w = torch.rand(26, *dims, generator=g)
    y_all = torch.rand(WORLD * B, *dims, generator=g)
    ref_w, ref_state = w.clone(), ck.PlasticityState.create(dims, WORLD * B)
    state = ck.PlasticityState.create(dims, WORLD * B)
    for _ in range(3):
        ck.ops.plasticity_step_(ref_w, y_all, ref_state, RULE)
        ckd.data_parallel_plasticity_step_(w, y_all[rank * B:(rank + 1) * B], state, RULE)
    assert not torch.equal(ref_w, torch.rand(26, *dims, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(w, ref_w, rtol=0, atol=1e-6)
    torch.testing.assert_close(state.x_pre, ref_state.x_pre, rtol=0, atol=1e-6)
    torch.testing.assert_close(state.theta, ref_state.theta, rtol=0, atol=1e-6)


def _dp_mean_delta(rank):
    g = torch.Generator().manual_seed(2)
    dims, B = (4, 5, 6), 2
    w0 = torch.rand(26, *dims, generator=g)
    ys = [torch.rand(B, *dims, generator=g) for _ in range(WORLD)]
    deltas = []
    for r in range(WORLD):  # each rank's own step, computed here for the expected mean
        wr = w0.clone()
        ck.ops.plasticity_step_(wr, ys[r], ck.PlasticityState.create(dims, B), RULE)
        deltas.append(wr - w0)
    w = w0.clone()
    ckd.data_parallel_plasticity_step_(w, ys[rank], ck.PlasticityState.create(dims, B), RULE, mode="mean_delta")
    torch.testing.assert_close(w, w0 + sum(deltas) / WORLD, rtol=0, atol=1e-6)
    assert (w != w0).any()
    others = [torch.empty_like(w) for _ in range(WORLD)]
    dist.all_gather(others, w)
    assert torch.equal(others[0], others[1])


@pytest.mark.parametrize("fn", [_dp_exact, _dp_mean_delta], ids=["exact", "mean_delta"])
def test_data_parallel_equals_single_process(fn):
    spawn(fn)


def _domain(rank, zb):
    g = torch.Generator().manual_seed(3)
    dims, B, C = (8, 5, 6), 2, 2
    boundary = (zb, "periodic", "zero")
    w = torch.rand(26, *dims, generator=g) * 0.2
    mask = torch.rand(26, *dims, generator=g) > 0.2
    s = torch.rand(B, C, *dims, generator=g) - 0.5
    x = torch.rand(B, C, *dims, generator=g)
    slabs = ckd.ZSlabs(dims, "moore", boundary)
    w_ext, m_ext = slabs.pad(slabs.local(w, 1), 1), slabs.pad(slabs.local(mask, 1), 1)
    s_loc, x_loc = slabs.local(s, 2).clone(), slabs.local(x, 2)
    state_ext = slabs.create_state(B)
    ref_w, ref_state, ref_s = w.clone(), ck.PlasticityState.create(dims, B), s.clone()
    for _ in range(3):
        prev, prev_loc = ref_s, s_loc
        ref_s = ck.ops.propagate(ref_s, ref_w, mask, x, leak=0.5, boundary=boundary)
        s_loc = slabs.propagate(s_loc, w_ext, m_ext, x_loc, leak=0.5)
        y = ck.ops.activity(prev, ref_s)
        ck.ops.plasticity_step_(ref_w, y, ref_state, RULE, mask, boundary=boundary)
        slabs.plasticity_step_(w_ext, ck.ops.activity(prev_loc, s_loc), state_ext, RULE, m_ext)
    torch.testing.assert_close(slabs.gather(s_loc, 2), ref_s, rtol=0, atol=1e-6)
    torch.testing.assert_close(slabs.gather(slabs.interior(w_ext, 1), 1), ref_w, rtol=0, atol=1e-6)
    torch.testing.assert_close(slabs.gather(slabs.interior(state_ext.x_pre, 1), 1), ref_state.x_pre, rtol=0, atol=1e-6)
    torch.testing.assert_close(slabs.gather(slabs.interior(state_ext.theta, 0), 0), ref_state.theta, rtol=0, atol=1e-6)
    assert not torch.equal(ref_w, w)
    assert slabs.halo_seconds > 0


def _domain_zero(rank):
    _domain(rank, "zero")


def _domain_periodic(rank):
    _domain(rank, "periodic")


@pytest.mark.parametrize("fn", [_domain_zero, _domain_periodic], ids=["zero-z", "periodic-z"])
def test_domain_decomposition_equals_single_process(fn):
    spawn(fn)


def test_split_z_and_errors():
    assert ckd.split_z(7, 2) == [(0, 4), (4, 7)]
    with pytest.raises(ValueError, match="D=1 planes over 2 ranks"):
        ckd.split_z(1, 2)
    with pytest.raises(RuntimeError, match="not initialised"):
        ckd.ZSlabs((4, 4, 4))
    with pytest.raises(ValueError, match="mode must be one of exact, mean_delta"):
        ckd.data_parallel_plasticity_step_(None, None, None, None, mode="bogus")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
