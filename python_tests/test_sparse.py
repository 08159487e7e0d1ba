"""cellkern.sparse: pruning invariants, the packed mask, the ELL form and its validation."""
import pytest
import torch

import cellkern as ck
from cellkern import sparse as S


def _w(K=26, dims=(3, 4, 5), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(K, *dims, generator=g, dtype=torch.float64).to(dtype)


# ---- prune ----

@pytest.mark.parametrize("keep", [0.0, 0.1, 0.25, 0.3, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("with_mask", [False, True], ids=["all-live", "masked"])
def test_prune_keeps_exactly_the_rounded_count_per_cell(keep, with_mask):
    w = _w()
    mask = (torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) < 0.6) if with_mask else None
    live = mask if mask is not None else torch.ones_like(w, dtype=torch.bool)
    kept = S.prune(w, mask, keep=keep)
    assert kept.dtype == torch.bool and kept.shape == w.shape
    n = live.sum(0)
    want = torch.floor(n.double() * keep + 0.5).long()
    assert torch.equal(kept.sum(0), want)
    assert not (kept & ~live).any(), "a pruned synapse came back"
    # the kept ones are the largest live |w| of each cell
    lo_kept = torch.where(kept, w.abs(), torch.inf).amin(0)
    hi_dropped = torch.where(live & ~kept, w.abs(), -torch.inf).amax(0)
    assert (lo_kept >= hi_dropped).all()


def test_prune_rounding_is_half_up():
    w = _w()
    assert int(S.prune(w, keep=0.3)[:, 0, 0, 0].sum()) == 8    # 7.8
    assert int(S.prune(w, keep=0.25)[:, 0, 0, 0].sum()) == 7   # 6.5
    assert int(S.prune(w, keep=0.24)[:, 0, 0, 0].sum()) == 6   # 6.24


def test_prune_ties_lower_k_wins():
    w = torch.full((26, 2, 2, 2), 0.5)
    w[20] = 0.9  # the largest, whatever its k
    kept = S.prune(w, keep=0.3)  # 8 of 26: offset 20, then the 7 lowest k of the tie
    want = torch.zeros(26, dtype=torch.bool)
    want[20] = True
    want[:7] = True
    assert torch.equal(kept[:, 1, 0, 1], want)
    # negative weights rank by |w|
    w[3] = -0.95
    assert bool(S.prune(w, keep=1 / 26)[3].all())


def test_prune_emergence_ranks_by_presynaptic_saliency():
    K, dims = 6, (4, 4, 4)
    w = torch.full((K,) + dims, 0.5)
    w[0] = 0.6  # magnitude prefers offset 0 everywhere
    sal = torch.zeros(dims)
    sal[:, :, 3] = 1.0  # salient plane x = 3
    by_mag = S.prune(w, keep=1 / 6, stencil="von_neumann")
    by_em = S.prune(w, keep=1 / 6, criterion="emergence", saliency=sal, lam=2.0, stencil="von_neumann")
    assert bool(by_mag[0].all())
    assert not torch.equal(by_mag, by_em)
    # cell x = 2 has the salient cell x = 3 as its (0, 0, +1) neighbour: offset 3 of von_neumann
    assert ck.stencil("von_neumann").offset_tuples[3] == (0, 0, 1)
    assert bool(by_em[3, :, :, 2].all()) and not by_em[0, :, :, 2].any()
    # λ = 0 is magnitude again
    assert torch.equal(S.prune(w, keep=1 / 6, criterion="emergence", saliency=sal, lam=0.0,
                               stencil="von_neumann"), by_mag)


def test_prune_takes_a_packed_mask():
    w = _w()
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(2)) < 0.5
    assert torch.equal(S.prune(w, S.pack_mask(mask), keep=0.5), S.prune(w, mask, keep=0.5))


def test_prune_validation():
    w = _w()
    with pytest.raises(ValueError, match=r"prune: keep must be in \[0, 1\], got 1.5"):
        S.prune(w, keep=1.5)
    with pytest.raises(ValueError, match=r"prune: criterion must be one of magnitude, emergence, got 'size'"):
        S.prune(w, criterion="size")
    with pytest.raises(ValueError, match=r"prune: criterion='emergence' needs saliency"):
        S.prune(w, criterion="emergence")
    with pytest.raises(ValueError, match=r"prune: saliency must have shape \(D, H, W\) = \(3, 4, 5\)"):
        S.prune(w, criterion="emergence", saliency=torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"prune: saliency is only used by criterion='emergence'"):
        S.prune(w, saliency=torch.ones(3, 4, 5))
    with pytest.raises(ValueError, match=r"prune: mask must have shape \(K, D, H, W\) = \(26, 3, 4, 5\), got \(26, 3, 4, 4\)"):
        S.prune(w, torch.ones(26, 3, 4, 4, dtype=torch.bool))


# ---- packed mask ----

@pytest.mark.parametrize("K", [1, 6, 26, 31, 32])
def test_pack_unpack_round_trip(K):
    mask = torch.rand(K, 3, 2, 5, generator=torch.Generator().manual_seed(K)) < 0.5
    mask[:, 0, 0, 0] = True  # every bit, the sign bit of K = 32 included
    packed = S.pack_mask(mask)
    assert packed.dtype == torch.int32 and packed.shape == (3, 2, 5)
    assert torch.equal(S.unpack_mask(packed, K), mask)
    assert int(packed[0, 0, 0]) == (-1 if K == 32 else (1 << K) - 1)


def test_pack_validation():
    with pytest.raises(ValueError, match=r"pack_mask: the packed mask holds 1 to 32 offsets, got K = 33"):
        S.pack_mask(torch.ones(33, 2, 2, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"pack_mask: mask must be a bool tensor"):
        S.pack_mask(torch.ones(6, 2, 2, 2))
    with pytest.raises(TypeError, match=r"unpack_mask: packed must be an int32 tensor"):
        S.unpack_mask(torch.ones(2, 2, 2, dtype=torch.int64), 6)
    with pytest.raises(ValueError, match=r"aggregate: a packed int32 mask must have shape \(D, H, W\) = \(3, 4, 5\)"):
        ck.ops.aggregate(torch.ones(1, 1, 3, 4, 5), _w(), torch.zeros(3, 4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"aggregate: a packed int32 mask holds at most 32 offsets, the stencil has K = 122"):
        ck.ops.aggregate(torch.ones(1, 1, 3, 4, 5), _w(122), torch.zeros(3, 4, 5, dtype=torch.int32), stencil="radius(3)")


# ---- ELL form ----

@pytest.mark.parametrize("keep", [0.0, 0.3, 1.0])
def test_to_from_ell_round_trip(keep):
    w = _w()
    mask = S.prune(w, keep=keep)
    mask[:, 0, 0, 0] = False  # one empty cell
    w_ell, idx = S.to_ell(w, mask)
    assert idx.dtype == torch.uint8 and w_ell.dtype == w.dtype
    assert w_ell.shape[0] == max(1, int(mask.sum(0).max()))
    empty = idx == S.EMPTY
    assert torch.equal((~empty).sum(0), mask.sum(0))
    assert (w_ell[empty] == 0).all()
    # live slots first, in ascending k
    k = torch.where(empty, 1000, idx.long())
    assert (k[1:] >= k[:-1]).all()
    w2, m2 = S.from_ell(w_ell, idx, 26)
    assert torch.equal(m2, mask) and torch.equal(w2, torch.where(mask, w, 0))
    sw = S.SparseWeights.from_dense(w, S.pack_mask(mask))
    assert torch.equal(sw.w_ell, w_ell) and sw.nbytes == w_ell.numel() * 4 + idx.numel()


def test_from_ell_is_differentiable():
    w = _w(dtype=torch.float64)
    w_ell, idx = S.to_ell(w, S.prune(w, keep=0.3))
    w_ell.requires_grad_()
    dense, _ = S.from_ell(w_ell, idx, 26)
    g = torch.randn_like(dense)
    (dense * g).sum().backward()
    assert torch.equal(w_ell.grad, S.gather_ell(g, idx, 26))


def test_ell_validation():
    w = _w()
    w_ell, idx = S.to_ell(w, S.prune(w, keep=0.3))
    s = torch.randn(1, 2, 3, 4, 5)
    with pytest.raises(TypeError, match=r"propagate: idx must be a uint8 tensor \(offset index, 255 = empty\), got torch.int64"):
        ck.ops.propagate(s, w_ell, idx.long())
    with pytest.raises(TypeError, match=r"SparseWeights: idx must be a uint8 tensor"):
        S.SparseWeights(w_ell, idx.to(torch.int32), 26)
    bad = idx.clone()
    bad[0, 1, 1, 1] = 26
    with pytest.raises(ValueError, match=r"propagate: idx must hold offsets < K = 26 or 255 \(empty\), got 26"):
        ck.ops.propagate(s, w_ell, bad)
    with pytest.raises(ValueError, match=r"from_ell: idx must hold offsets < K = 20 or 255"):
        S.from_ell(w_ell, idx, 20)
    dup = idx.clone()
    dup[1] = dup[0]
    with pytest.raises(ValueError, match=r"stdp_: idx names an offset twice in one cell"):
        z = torch.zeros(1, 3, 4, 5)
        ck.ops.stdp_(w_ell, z, z.clone(), z.clone(), mask=dup, a_plus=1, a_minus=1, tau_plus=1, tau_minus=1)
    with pytest.raises(ValueError, match=r"aggregate: idx must have the shape of w_ell \(8, 3, 4, 5\), got \(8, 3, 4, 4\)"):
        ck.ops.aggregate(s, w_ell, idx[..., :4])
    with pytest.raises(ValueError, match=r"aggregate: w must have shape \(Kmax, D, H, W\) with 1 <= Kmax <= K = 26"):
        ck.ops.aggregate(torch.randn(1, 2, 3, 4, 4), w_ell, idx)
    with pytest.raises(ValueError, match=r"SparseWeights: w_ell has Kmax = 8 slots, more than the stencil's K = 6"):
        S.SparseWeights(w_ell, idx, 6)
    sw = S.SparseWeights(w_ell, idx, 26)
    with pytest.raises(ValueError, match=r"aggregate: mask must be None when w is a SparseWeights"):
        ck.ops.aggregate(s, sw, torch.ones(26, 3, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"aggregate: w is a SparseWeights of K = 26 offsets, the stencil has K = 6"):
        ck.ops.aggregate(s, sw, stencil="von_neumann")
    with pytest.raises(TypeError, match=r"propagate: w must have the dtype of s \(torch.float32\), got torch.float64"):
        ck.ops.propagate(s, w_ell.double(), idx)


def test_readme_sparsity_example_runs():
    import pathlib
    import re

    readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme.read_text(), re.S) if "SparseWeights" in b)
    ns: dict = {}
    exec(compile(block, "README.md", "exec"), ns)
    sw = ns["sw"]
    assert sw.Kmax == 8 and sw.dtype == torch.bfloat16 and ns["state"].step == 1
    assert sw.nbytes == 24 * 16 ** 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_cpu_ell_conversions_equal_the_torch_ones(dtype):
    if "cpu" not in ck.available_backends():
        pytest.skip("the C++ extension did not load")
    from cellkern.backends import cpu

    w = _w(dims=(3, 5, 7)).to(dtype)
    mask = S.prune(w, keep=0.4)
    mask[:, 1, 1, 1] = False
    w_ell, idx = S.to_ell(w, mask)
    got_w, got_m = cpu.ell_expand(w_ell, idx, 26)
    want_w, want_m = S.from_ell(w_ell, idx, 26)
    assert torch.equal(got_w, want_w) and torch.equal(got_m, want_m)
    dense = torch.randn(26, 3, 5, 7).to(dtype)
    out = torch.full_like(w_ell, float("nan"))
    cpu.ell_gather_(out, idx, dense)
    assert torch.equal(out, S.gather_ell(dense, idx, 26))
