"""Clustering and coordination (SPEC §6)."""
import itertools

import pytest
import torch

import cellkern as ck
from cellkern.train.clustering import cluster_cells, coordinate_, coordination_factor, spherical_kmeans


def blobs(n_per=40, k=4, F=10, spread=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    dirs = torch.eye(F)[:k] + 0.1  # k directions, pairwise far apart in angle
    x = torch.cat([d * (1 + torch.rand(n_per, 1, generator=g)) + spread * torch.randn(n_per, F, generator=g)
                   for d in dirs])
    return x, torch.arange(k).repeat_interleave(n_per)


def same_partition(a, b):
    """Labels equal up to a renaming of the clusters."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_kmeans_recovers_separated_clusters(seed):
    x, truth = blobs()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    labels, cent = spherical_kmeans(x[perm], k=4, seed=seed)
    assert same_partition(labels, truth[perm])
    assert labels.dtype == torch.int64 and cent.shape == (4, 10)
    assert torch.allclose(cent.norm(dim=1), torch.ones(4), atol=1e-5)


def test_kmeans_is_cosine_not_euclidean():
    # the same direction at very different lengths is one cluster
    x = torch.tensor([[1.0, 0.0], [100.0, 1.0], [0.0, 1.0], [1.0, 80.0]])
    labels, _ = spherical_kmeans(x, k=2, seed=0)
    assert labels[0] == labels[1] and labels[2] == labels[3] and labels[0] != labels[2]


def test_kmeans_same_seed_same_labels():
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(5))
    a, ca = spherical_kmeans(x, k=8, seed=3)
    b, cb = spherical_kmeans(x, k=8, seed=3)
    assert torch.equal(a, b) and torch.equal(ca, cb)
    assert any(not torch.equal(a, spherical_kmeans(x, k=8, seed=s)[0]) for s in range(4, 10))


def test_kmeans_no_empty_cluster_and_small_n():
    # duplicated points: k-means++ runs out of distinct draws; every label still used
    x = torch.tensor([[1.0, 0.0]] * 6 + [[0.0, 1.0]] * 2)
    labels, cent = spherical_kmeans(x, k=4, seed=0)
    assert sorted(set(labels.tolist())) == [0, 1, 2, 3]
    labels, cent = spherical_kmeans(torch.randn(3, 4), k=8)
    assert cent.shape == (3, 4) and sorted(labels.tolist()) == [0, 1, 2]


def test_cluster_cells_two_halves():
    K, dims = 26, (4, 6, 6)
    w = torch.full((K,) + dims, 0.1)
    w[:13, :, :3] = 1.0  # left half: strong first offsets; right half: strong last offsets
    w[13:, :, 3:] = 1.0
    labels, cent = cluster_cells(w, k=2, seed=0)
    assert labels.shape == dims and cent.shape == (2, K)
    assert (labels[:, :3] == labels[0, 0, 0]).all() and (labels[:, 3:] == labels[0, 5, 0]).all()
    assert labels[0, 0, 0] != labels[0, 5, 0]


def test_cluster_cells_activity_and_mask_change_the_features():
    w = torch.ones(6, 2, 4, 4)
    act = torch.zeros(2, 4, 4)
    act[:, :, 2:] = 1.0
    labels, cent = cluster_cells(w, act, k=2)
    assert cent.shape == (2, 7)
    assert (labels[:, :, :2] == labels[0, 0, 0]).all() and (labels[:, :, 2:] != labels[0, 0, 0]).all()
    mask = torch.ones(6, 2, 4, 4, dtype=torch.bool)
    mask[:3, 1] = False
    ml, _ = cluster_cells(w, k=2, mask=mask)
    assert (ml[0] == ml[0, 0, 0]).all() and (ml[1] != ml[0, 0, 0]).all()


@pytest.mark.parametrize("boundary", ["periodic", "zero", ("zero", "periodic", "periodic")])
@pytest.mark.parametrize("stencil", ["von_neumann", "moore"])
def test_coordination_factor_matches_neighbour_labels(stencil, boundary):
    dims = (3, 4, 5)
    labels = torch.randint(0, 3, dims, generator=torch.Generator().manual_seed(0))
    kappa = 0.25
    f = coordination_factor(labels, kappa, stencil=stencil, boundary=boundary)
    st = ck.stencil(stencil)
    per = ck.parse_boundary(boundary)
    assert f.shape == (st.K,) + dims and f.dtype == torch.float32
    for k, (z, y, x) in itertools.product(range(st.K), itertools.product(*map(range, dims))):
        o = st.offsets[k].tolist()
        n = [z + o[0], y + o[1], x + o[2]]
        inside = all(per[a] == "periodic" or 0 <= n[a] < dims[a] for a in range(3))
        want = 1.0 if not inside else (1 + kappa if labels[z, y, x] == labels[tuple(
            n[a] % dims[a] for a in range(3))] else 1 - kappa)
        assert float(f[k, z, y, x]) == pytest.approx(want)


def test_coordinate_scales_only_ltp():
    g = torch.Generator().manual_seed(0)
    before = torch.rand(6, 3, 3, 3, generator=g) * 0.8 + 0.1
    dw = torch.randn(6, 3, 3, 3, generator=g) * 0.05
    after = (before + dw).clamp(0.1, 0.9)
    factor = torch.rand(6, 3, 3, 3, generator=g) + 0.5
    w = after.clone()
    coordinate_(w, before, factor, w_min=0.1, w_max=0.9)
    step = after - before
    want = torch.where(step > 0, (before + step * factor).clamp(0.1, 0.9), after)
    assert torch.allclose(w, want, atol=1e-7)
    assert torch.equal(w[step <= 0], after[step <= 0])
    assert (w >= 0.1).all() and (w <= 0.9).all()


def test_coordinate_never_scales_w_itself():
    w = torch.rand(26, 3, 3, 3) + 0.5
    w0 = w.clone()
    f = torch.full_like(w, 1.5)
    coordinate_(w, w.clone(), f, w_min=0.0, w_max=2.0)  # Δw = 0
    coordinate_(w, w.clone(), f, w_min=0.0, w_max=2.0)  # and again
    assert torch.equal(w, w0)


def test_coordinate_respects_bounds_and_mask():
    before = torch.full((6, 2, 2, 2), 1.0)
    w = torch.full((6, 2, 2, 2), 1.5)
    mask = torch.ones(6, 2, 2, 2, dtype=torch.bool)
    mask[0] = False
    coordinate_(w, before, torch.tensor(3.0), w_min=0.0, w_max=2.0, mask=mask)
    assert torch.equal(w[0], torch.full((2, 2, 2), 1.5))  # masked: untouched
    assert torch.equal(w[1:], torch.full((5, 2, 2, 2), 2.0))  # 1 + 0.5·3 = 2.5 clamped to 2


def test_coordinate_after_a_plasticity_step():
    torch.manual_seed(0)
    dims = (4, 4, 4)
    w = torch.full((26,) + dims, 0.5)
    state = ck.PlasticityState.create(dims, batch=2)
    rule = ck.PlasticityRule(w_min=0.1, w_max=2.0, bcm=None, competition=None, normalize=False)
    before = w.clone()
    ck.ops.plasticity_step_(w, torch.rand(2, *dims) * 0.2, state, rule)
    ck.ops.plasticity_step_(w, torch.rand(2, *dims) * 0.2, state, rule)  # traces now drive LTP
    before = w.clone()
    ck.ops.plasticity_step_(w, torch.rand(2, *dims) * 0.2, state, rule)
    plain = w.clone()
    labels = (torch.arange(4).view(4, 1, 1) >= 2).long().expand(dims)
    f = coordination_factor(labels, 0.5)
    coordinate_(w, before, f, w_min=0.1, w_max=2.0)
    ltp = plain > before
    assert ltp.any()
    assert torch.allclose((w - before)[ltp], ((plain - before) * f)[ltp], atol=1e-6)


@pytest.mark.parametrize("call, match", [
    (lambda: spherical_kmeans(torch.randn(5), k=2), r"x must be a float tensor \(N, F\)"),
    (lambda: spherical_kmeans(torch.randn(5, 2), k=0), "k must be a positive int, got 0"),
    (lambda: cluster_cells(torch.rand(6, 2, 2), k=2), r"w must be a float tensor \(K, D, H, W\)"),
    (lambda: cluster_cells(torch.rand(6, 2, 2, 2), torch.rand(2, 2), k=2), r"activity must have shape \(D, H, W\)"),
    (lambda: coordination_factor(torch.zeros(2, 2, 2), 0.1), "labels must be an integer tensor"),
    (lambda: coordination_factor(torch.zeros(2, 2, 2, dtype=torch.long), 1.5), r"kappa must be in \[0, 1\]"),
    (lambda: coordination_factor(torch.zeros(2, 2, 2, dtype=torch.long), 0.1, stencil="hex"), "coordination_factor"),
    (lambda: coordinate_(torch.rand(6, 2, 2, 2), torch.rand(6, 2, 2, 1), torch.ones(1), w_min=0, w_max=1),
     "w_before must match w"),
    (lambda: coordinate_(torch.rand(6, 2, 2, 2), torch.rand(6, 2, 2, 2), torch.ones(5), w_min=0, w_max=1),
     "factor must be broadcastable"),
    (lambda: coordinate_(torch.rand(6, 2, 2, 2), torch.rand(6, 2, 2, 2), torch.ones(1), w_min=1, w_max=0),
     "w_min must be <= w_max"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
