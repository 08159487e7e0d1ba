"""Profiles and the transfer between stages (SPEC §8)."""
import dataclasses
import math

import pytest
import torch

import cellkern as ck
from cellkern.train.config import RuleConfig
from cellkern.train.config import PROFILE_TABLE, make_rule, profile
from cellkern.train.transfer import resample_field, resample_mask, transfer

BOUNDARY = ("zero", "periodic", "periodic")


def test_profiles_show_their_numbers():
    p = profile("learning")
    assert (p.lr_multiplier, p.activity_threshold, p.competition, p.tau_theta) == (0.5, 0.02, 0.5, 1000.0)
    assert [profile(n).lr_multiplier for n in ("discovery", "learning", "consolidation", "freeze")] == \
        [1.0, 0.5, 0.2, 0.0]
    with pytest.raises(ValueError, match="must be one of discovery"):
        profile("cram")


def _step(prof, seed=0):
    """One plasticity step with the rule and lr scale a profile gives."""
    g = torch.Generator().manual_seed(seed)
    dims = (5, 6, 6)
    w = 0.1 + 0.5 * torch.rand(26, *dims, generator=g)
    y = 0.2 * torch.rand(2, *dims, generator=g)
    state = ck.PlasticityState.create(dims, batch=2)
    state.x_pre.copy_(torch.rand(2, *dims, generator=g))
    state.x_post.copy_(torch.rand(2, *dims, generator=g))
    rule = make_rule(RuleConfig(stdp_lr=1.0, bcm_lr=1.0), prof)
    ck.ops.plasticity_step_(w, y, state, rule, lr_scale=prof.lr_multiplier, boundary=BOUNDARY)
    return w, state.theta


@pytest.mark.parametrize("field, value", [("lr_multiplier", 0.25), ("activity_threshold", 0.1),
                                          ("competition", 0.0), ("tau_theta", 10.0)])
def test_each_profile_field_changes_the_step(field, value):
    base = PROFILE_TABLE["learning"]
    w0, t0 = _step(base)
    w1, t1 = _step(dataclasses.replace(base, **{field: value}))
    assert not (torch.equal(w0, w1) and torch.equal(t0, t1)), field


def test_smooth_field_survives_resampling():
    """A smooth weight field per offset, sampled on 16³ and resampled to
    20×24×24, matches the analytic field on the new grid."""
    def field(dims, k):
        zs = [torch.linspace(0, 1, n, dtype=torch.float64) for n in dims]
        z, y, x = torch.meshgrid(*zs, indexing="ij")
        return 1.0 + 0.4 * torch.sin(math.pi * z + 0.1 * k) * torch.cos(math.pi * y) + 0.2 * x * (k % 3)

    w = torch.stack([field((16, 16, 16), k) for k in range(26)]).float()
    theta = field((16, 16, 16), 0).float() * 0.01
    w2, t2, m2 = transfer(w, theta, None, (20, 24, 24), w_min=0.1, w_max=2.0)
    want = torch.stack([field((20, 24, 24), k) for k in range(26)]).float()
    assert w2.shape == (26, 20, 24, 24) and m2 is None
    assert (w2 - want).abs().max() < 0.01
    assert (t2 - field((20, 24, 24), 0).float() * 0.01).abs().max() < 1e-4


def test_mask_transfers_by_nearest_neighbour():
    mask = torch.zeros(26, 4, 4, 4, dtype=torch.bool)
    mask[:, :2] = True
    m2 = resample_mask(mask, (8, 8, 8))
    assert m2.dtype == torch.bool and m2[:, :4].all() and not m2[:, 4:].any()


def test_resample_same_dims_is_a_copy():
    w = torch.rand(26, 3, 4, 5)
    out = resample_field(w, (3, 4, 5))
    assert torch.equal(out, w) and out.data_ptr() != w.data_ptr()
