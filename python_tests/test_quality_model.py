"""The quality benchmark's plain-torch mixing lattice follows SPEC §11, and its protocol is fair."""
import itertools

import numpy as np
import pytest
import torch

from benchmarks import quality as Q
from benchmarks.quality_model import (
    LatticeSpec,
    MixingLattice,
    aggregate,
    competitive_hebbian_step_,
    gather,
    in_lattice_mask,
    resolve_stencil,
)


def _nbr(i, o, dims, periodic):
    out = []
    for a in range(3):
        v = i[a] + o[a]
        if periodic[a]:
            v %= dims[a]
        elif not 0 <= v < dims[a]:
            return None
        out.append(v)
    return tuple(out)


def _loop_aggregate(s, W, st, periodic):
    B, C, D, H, Wd = s.shape
    O = W.shape[1]
    a = torch.zeros(B, O, D, H, Wd, dtype=s.dtype)
    for i in itertools.product(range(D), range(H), range(Wd)):
        for k, o in enumerate(st.offset_tuples):
            j = _nbr(i, o, (D, H, Wd), periodic)
            if j is None:
                continue
            a[:, :, i[0], i[1], i[2]] += torch.einsum("oc,bc->bo", W[k, :, :, i[0], i[1], i[2]], s[:, :, j[0], j[1], j[2]])
    return a


@pytest.mark.parametrize("name,periodic", [("moore", (False, False, False)), ("von_neumann", (True, False, True)),
                                           ("ff", (False, False, False))])
def test_aggregate_matches_spec_loop(name, periodic):
    g = torch.Generator().manual_seed(0)
    st = resolve_stencil(name)
    s = torch.randn(2, 3, 3, 4, 3, generator=g, dtype=torch.float64)
    W = torch.randn(st.K, 3, 3, 3, 4, 3, generator=g, dtype=torch.float64)
    got = aggregate(gather(s, st, periodic), W)
    torch.testing.assert_close(got, _loop_aggregate(s, W, st, periodic))


@pytest.mark.parametrize("tau,average", [(0.7, "wins"), (0.7, "batch"), (0.0, "wins")])
def test_competitive_hebbian_matches_spec_formula(tau, average):
    g = torch.Generator().manual_seed(1)
    st = resolve_stencil("moore")
    periodic = (False, False, False)
    dims = (3, 3, 4)
    C, B = 4, 5
    s = torch.rand((B, C) + dims, generator=g, dtype=torch.float64)
    W = torch.randn((st.K, C, C) + dims, generator=g, dtype=torch.float64) * 0.2
    beta = torch.randn((C,) + dims, generator=g, dtype=torch.float64) * 0.1
    live = in_lattice_mask(dims, st, periodic)
    W1, beta1 = W.clone(), beta.clone()
    S = gather(s, st, periodic)
    competitive_hebbian_step_(W1, S, beta1, eta=0.1, tau=tau, eta_beta=0.05, average=average, plastic=live)
    # the SPEC, written out
    u = _loop_aggregate(s, W, st, periodic)
    if tau > 0:
        p = torch.softmax((u + beta) / tau, dim=1)
    else:
        p = torch.nn.functional.one_hot((u + beta).argmax(1), C).permute(0, 4, 1, 2, 3).to(u.dtype)
    n = 1 + p.sum(0) if average == "wins" else torch.full_like(p.sum(0), B)
    dW = torch.zeros_like(W)
    for k in range(st.K):
        for o in range(C):
            for c in range(C):
                dW[k, o, c] = 0.1 / n[o] * (p[:, o] * (S[:, k, c] - u[:, o] * W[k, o, c])).sum(0)
    dW = dW * live[:, None, None]
    torch.testing.assert_close(W1, W + dW)
    torch.testing.assert_close(beta1, beta - 0.05 * (p.mean(0) - 1.0 / C))
    # out-of-lattice synapses never change
    assert torch.equal(W1[~live.unsqueeze(1).unsqueeze(1).expand_as(W)], W[~live.unsqueeze(1).unsqueeze(1).expand_as(W)])


def test_triangle_and_drive_on_input_face():
    spec = LatticeSpec(C=4, D=2)
    W0 = torch.zeros((9, 4, 4, 2, 3, 3))
    lat = MixingLattice(spec, (3, 3), W0)
    img = torch.rand(2, 3, 3)
    s = lat.run(img)[-1]
    # z = 0: triangle of (x, 0, 0, 0) = (3x/4, 0, 0, 0); z = 1 reads nothing through zero weights
    torch.testing.assert_close(s[:, 0, 0], img * 0.75)
    assert s[:, 1:, 0].abs().max() == 0 and s[:, :, 1].abs().max() == 0


def test_no_plasticity_means_trained_equals_twin():
    X, y, _ = Q.load_data("digits")
    cfg = Q.QualityConfig.from_items(["eta=0", "epochs=1"])
    r = Q.run_seed(X, y, cfg, 0, 300, "val")
    assert r["rows"]["trained"]["acc"] == r["rows"]["twin"]["acc"]
    assert r["dW_rel"] == 0.0
    cfg = Q.QualityConfig.from_items(["epochs=1"])
    r = Q.run_seed(X, y, cfg, 0, 300, "val")
    assert r["dW_rel"] > 0.1


def test_signal_below_threshold_is_an_error():
    X, y, _ = Q.load_data("digits")
    cfg = Q.QualityConfig.from_items(["drive_gain=1e-6", "epochs=1"])
    with pytest.raises(RuntimeError, match="below 1e-3"):
        Q.evaluate(X, y, cfg, [0], 300, "val")


def test_splits_keep_evaluation_images_out_of_plasticity():
    _, y, _ = Q.load_data("digits")
    for mode in ("val", "test"):
        plastic, lab, ev = Q.split(y, 3, 300, mode)
        assert not set(plastic) & set(ev)
        assert set(lab) <= set(plastic) and len(lab) == 300


def test_idx_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(40, 6, 5), dtype=np.uint8)
    labs = np.repeat(np.arange(4), 10).astype(np.uint8)
    Q.write_idx(str(tmp_path / "toy-images-idx3-ubyte.gz"), imgs)
    Q.write_idx(str(tmp_path / "toy-labels-idx1-ubyte.gz"), labs)
    X, y, tag = Q.load_data(str(tmp_path / "toy-images-idx3-ubyte.gz"))
    np.testing.assert_allclose(X, imgs / 255.0, rtol=1e-6)
    assert y.tolist() == labs.tolist() and tag == "toy-images-idx3-ubyte"


def test_regime_cache_reuses_the_same_trained_lattice():
    X, y, _ = Q.load_data("digits")
    cfg = Q.QualityConfig.from_items(["epochs=1"])
    cache = {}
    a = Q.run_seed(X, y, cfg, 2, 300, "val", cache)
    b = Q.run_seed(X, y, cfg, 2, "all", "val", cache)
    c = Q.run_seed(X, y, cfg, 2, "all", "val")
    assert a["dW_rel"] == b["dW_rel"] == c["dW_rel"]
    assert b["rows"]["trained"]["acc"] == c["rows"]["trained"]["acc"]
