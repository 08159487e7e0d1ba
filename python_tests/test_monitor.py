"""Decoder monitor (SPEC §9): the closed-form ridge decoder and its rolling buffer."""
import pytest
import torch

from cellkern.train.monitor import PrequentialDecoder, RidgeDecoder


def separable(n, F=12, classes=4, seed=0):
    """Well-separated Gaussian blobs (centres 8 apart along their own axis, unit
    noise): linearly separable with overwhelming probability."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    centres = torch.zeros(classes, F)
    centres[torch.arange(classes), torch.arange(classes)] = 8.0
    return centres[y] + torch.randn(n, F, generator=g), y


def test_ridge_separable_labels_accuracy_near_one():
    X, y = separable(2000)
    Xt, yt = separable(500, seed=1)
    dec = RidgeDecoder(alpha=1e-3).fit(X, y)
    assert dec.score(X, y) > 0.99 and dec.score(Xt, yt) > 0.99
    assert dec.predict(Xt).dtype == torch.int64


def test_ridge_is_the_closed_form_with_standardisation_and_bias():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(50, 6, generator=g, dtype=torch.float64) * torch.arange(1, 7) + 5
    Y = torch.randn(50, 2, generator=g, dtype=torch.float64)
    dec = RidgeDecoder(alpha=0.7).fit(X, Y)
    Z = (X - X.mean(0)) / X.std(0, unbiased=False)
    W = torch.linalg.inv(Z.T @ Z + 0.7 * torch.eye(6, dtype=torch.float64)) @ Z.T @ (Y - Y.mean(0))
    assert torch.allclose(dec.weight, W, atol=1e-10) and torch.allclose(dec.bias, Y.mean(0))
    # the dual form (n < F) gives the same solution
    Xw, Yw = X[:5], Y[:5]
    primal = RidgeDecoder(alpha=0.7)
    primal.mean, primal.scale = Xw.mean(0), Xw.std(0, unbiased=False)
    Zw = (Xw - primal.mean) / primal.scale
    Wp = torch.linalg.solve(Zw.T @ Zw + 0.7 * torch.eye(6, dtype=torch.float64), Zw.T @ (Yw - Yw.mean(0)))
    assert torch.allclose(RidgeDecoder(alpha=0.7).fit(Xw, Yw).weight, Wp, atol=1e-10)


def test_ridge_vectors_r2():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(400, 8, generator=g)
    Y = X @ torch.randn(8, 3, generator=g) + 2.0
    dec = RidgeDecoder(alpha=1e-4).fit(X, Y)
    assert dec.score(X, Y) > 0.999
    assert dec.predict(X).shape == (400, 3)
    noise = torch.randn(400, 3, generator=g)
    assert abs(RidgeDecoder().fit(X, noise).score(torch.randn(400, 8, generator=g), noise)) < 0.1
    # a larger penalty shrinks the fit
    assert RidgeDecoder(alpha=1e4).fit(X, Y).score(X, Y) < dec.score(X, Y)


def test_ridge_constant_feature_is_harmless():
    X, y = separable(300)
    X = torch.cat([X, torch.ones(300, 1)], 1)
    assert RidgeDecoder(alpha=1e-3).fit(X, y).score(X, y) > 0.99


@pytest.mark.parametrize("call, match", [
    (lambda: RidgeDecoder(alpha=0), "alpha must be a finite number > 0"),
    (lambda: RidgeDecoder(n_classes=0), "n_classes must be a positive int"),
    (lambda: RidgeDecoder().fit(torch.randn(5, 3), torch.rand(5)), "labels y .* must be integers"),
    (lambda: RidgeDecoder().fit(torch.randn(5, 3), torch.zeros(4, dtype=torch.long)), r"n = 5, got \(4,\)"),
    (lambda: RidgeDecoder().fit(torch.randn(5), torch.zeros(5, dtype=torch.long)), r"X must be a float tensor \(n, F\)"),
    (lambda: RidgeDecoder().predict(torch.randn(5, 3)), "call fit first"),
    (lambda: RidgeDecoder().fit(torch.randn(5, 3), torch.zeros(5, dtype=torch.long)).predict(torch.randn(5, 4)),
     "X must have 3 features"),
    (lambda: RidgeDecoder(n_classes=2).fit(torch.randn(5, 3), torch.arange(5)), "labels must be < n_classes = 2"),
    (lambda: RidgeDecoder().fit(torch.randn(5, 3), torch.arange(5)).score(torch.randn(5, 3), torch.randn(5, 2)),
     r"y must be labels \(n,\) as in fit"),
])
def test_ridge_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_prequential_scores_only_new_samples_then_refits():
    X, y = separable(400)
    d = PrequentialDecoder(buffer=1000, alpha=1e-3)
    assert d.evaluate() == (None, 0)                       # nothing seen yet
    d.observe(X[:100], y[:100])
    assert d.evaluate() == (None, 0)                       # first point only fits
    assert d.evaluate() == (None, 0)                       # no new samples since
    d.observe(X[100:160], y[100:160])
    acc, n = d.evaluate()
    assert n == 60 and acc > 0.95


def test_prequential_buffer_keeps_only_the_last_samples():
    d = PrequentialDecoder(buffer=10)
    X = torch.arange(37, dtype=torch.float32).view(-1, 1).repeat(1, 3)
    y = torch.arange(37) % 2
    for b, e in ((0, 4), (4, 11), (11, 12), (12, 30), (30, 37)):
        d.observe(X[b:b + (e - b)], y[b:e])
    held = torch.cat(d.x)
    # whole batches drop out while the rest still holds >= buffer samples
    assert held.shape[0] == 25 and torch.equal(held[:, 0], torch.arange(12, 37).float())


def test_prequential_refit_uses_only_the_buffer():
    # early samples follow one rule, later ones the opposite; a buffer holding
    # only late samples must decode the late rule and fail the early one
    g = torch.Generator().manual_seed(0)
    X = torch.randn(1200, 6, generator=g)
    early, late = (X[:, 0] > 0).long(), (X[:, 0] <= 0).long()
    d = PrequentialDecoder(buffer=200, alpha=1e-3)
    for b in range(0, 1000, 50):
        d.observe(X[b:b + 50], (early if b < 600 else late)[b:b + 50])
    d.evaluate()
    test = slice(1000, 1200)
    assert d.decoder.score(X[test], late[test]) > 0.95
    assert d.decoder.score(X[test], early[test]) < 0.05
    big = PrequentialDecoder(buffer=1000, alpha=1e-3)
    for b in range(0, 1000, 50):
        big.observe(X[b:b + 50], (early if b < 600 else late)[b:b + 50])
    big.evaluate()
    assert big.decoder.score(X[test], late[test]) < 0.9


def test_prequential_vectors():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(300, 5, generator=g)
    Y = X @ torch.randn(5, 2, generator=g)
    d = PrequentialDecoder(buffer=128, alpha=1e-4)
    d.observe(X[:150], Y[:150])
    d.evaluate()
    d.observe(X[150:], Y[150:])
    r2, n = d.evaluate()
    assert n == 150 and r2 > 0.999


def test_prequential_bad_input():
    with pytest.raises(ValueError, match="buffer must be a positive int, got 0"):
        PrequentialDecoder(buffer=0)
    with pytest.raises(ValueError, match="alpha must be"):
        PrequentialDecoder(alpha=-1.0)
