"""Emergence metrics and saliency (SPEC §7) on fields with known answers."""
import math

import pytest
import torch

from cellkern.train.emergence import branching_ratio, emergence_metrics, power_spectrum, saliency, weight_field

DIMS = (8, 16, 32)


def plane_wave(lam, axis=2, dims=DIMS, phase=0.3):
    x = torch.arange(dims[axis], dtype=torch.float64)
    shape = [1, 1, 1]
    shape[axis] = dims[axis]
    return torch.cos(2 * math.pi * x / lam + phase).view(shape).expand(dims).contiguous()


def smooth_noise(width, dims=DIMS, seed=0):
    """White noise low-passed by a Gaussian of ``width`` cells (periodic)."""
    n = torch.randn(dims, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    k2 = sum(a ** 2 for a in torch.meshgrid(*(torch.fft.fftfreq(d, dtype=torch.float64) for d in dims),
                                             indexing="ij"))
    return torch.fft.ifftn(torch.fft.fftn(n) * torch.exp(-2 * (math.pi * width) ** 2 * k2)).real


@pytest.mark.parametrize("lam, axis", [(4, 2), (8, 2), (16, 2), (8, 1), (4, 0), (2, 0)])
def test_plane_wave_wavelength_entropy_top_power(lam, axis):
    m = emergence_metrics(plane_wave(lam, axis))
    assert m["dominant_wavelength"] == pytest.approx(lam)
    assert m["spectral_entropy"] < 0.1  # all power in the ±k pair: log 2 / log M (1 mode at Nyquist: 0)
    assert m["top_m_power"] == pytest.approx(1.0)
    assert set(m) == {"spectral_entropy", "dominant_wavelength", "top_m_power", "autocorr_length"}


def test_plane_wave_autocorr_length():
    # autocorrelation of a plane wave averaged over a lattice direction: cos(2πr/λ) → 1/e at r = λ·acos(1/e)/2π
    m = emergence_metrics(plane_wave(32, axis=2, dims=(1, 1, 32)))
    assert m["autocorr_length"] == pytest.approx(32 * math.acos(math.exp(-1)) / (2 * math.pi), abs=0.15)


def test_white_noise_entropy_near_one():
    f = torch.randn(DIMS, generator=torch.Generator().manual_seed(0))
    m = emergence_metrics(f, top_m=8)
    assert m["spectral_entropy"] > 0.9
    assert m["top_m_power"] < 0.02
    assert m["autocorr_length"] < 1.0


def test_smoother_fields_have_longer_correlations_and_lower_entropy():
    ms = [emergence_metrics(smooth_noise(w)) for w in (0.5, 1.5, 3.0)]
    assert ms[0]["autocorr_length"] < ms[1]["autocorr_length"] < ms[2]["autocorr_length"]
    assert ms[0]["spectral_entropy"] > ms[1]["spectral_entropy"] > ms[2]["spectral_entropy"]


def test_top_m_counts_modes():
    f = plane_wave(8) + 0.5 * plane_wave(4, axis=1)
    assert emergence_metrics(f, top_m=2)["top_m_power"] == pytest.approx(0.8)  # 1 : 0.25 power
    assert emergence_metrics(f, top_m=4)["top_m_power"] == pytest.approx(1.0)


def test_constant_field_has_no_pattern():
    m = emergence_metrics(torch.full(DIMS, 3.0))
    assert m == dict(spectral_entropy=0.0, dominant_wavelength=0.0, top_m_power=0.0, autocorr_length=0.0)
    assert torch.equal(saliency(torch.full(DIMS, 3.0)), torch.zeros(DIMS))
    assert float(power_spectrum(torch.full(DIMS, 3.0)).abs().max()) < 1e-9


def test_power_spectrum_parseval():
    f = torch.randn(DIMS, dtype=torch.float64)
    P = power_spectrum(f)
    assert P.shape == DIMS and float(P[0, 0, 0]) < 1e-18
    assert float(P.sum()) / f.numel() == pytest.approx(float((f - f.mean()).square().sum()))


def test_saliency_of_a_plane_wave_is_the_wave_in_unit_range():
    f = 5 + 2 * plane_wave(8)
    s = saliency(f, top_m=1)
    assert s.shape == DIMS and float(s.min()) >= 0 and float(s.max()) <= 1
    want = (plane_wave(8) - plane_wave(8).min()) / (plane_wave(8).max() - plane_wave(8).min())
    assert torch.allclose(s, want, atol=1e-9)


def test_saliency_band_passes_the_strongest_modes():
    g = torch.Generator().manual_seed(1)
    wave = plane_wave(8)
    noisy = wave + 0.3 * torch.randn(DIMS, generator=g, dtype=torch.float64)
    s = saliency(noisy, top_m=1)
    assert float(s.min()) == 0.0 and float(s.max()) == 1.0
    assert torch.corrcoef(torch.stack([s.flatten(), wave.flatten()]))[0, 1] > 0.99
    assert saliency(torch.randn(DIMS, generator=g)).dtype == torch.float32


def test_branching_ratio_known_sequences():
    a = torch.zeros(2, *DIMS, dtype=torch.bool)
    b = a.clone()
    a.view(-1)[:40] = True
    b.view(-1)[100:160] = True
    assert branching_ratio(a, b) == pytest.approx(1.5)
    assert branching_ratio(b, a) == pytest.approx(40 / 60)
    assert branching_ratio(a.float() * 0.3, a.float()) == 1.0
    assert math.isnan(branching_ratio(torch.zeros(DIMS), torch.ones(DIMS)))


def test_weight_field_sums_absolute_live_weights():
    w = torch.randn(26, 3, 4, 5)
    assert torch.allclose(weight_field(w), w.abs().sum(0))
    mask = torch.rand(26, 3, 4, 5) > 0.5
    assert torch.allclose(weight_field(w, mask), (w.abs() * mask).sum(0))


@pytest.mark.parametrize("call, match", [
    (lambda: emergence_metrics(torch.rand(4, 4)), r"f must be a field tensor \(D, H, W\)"),
    (lambda: emergence_metrics(torch.rand(4, 4, 4), top_m=0), "top_m must be a positive int, got 0"),
    (lambda: saliency(torch.rand(4, 4, 4, dtype=torch.complex64)), "f must be real"),
    (lambda: branching_ratio(torch.ones(4, 4, 4), torch.ones(4, 4, 5)), "active_t1 must have the shape"),
    (lambda: branching_ratio(torch.ones(4), torch.ones(4)), r"active_t must be a tensor \(\.\.\., D, H, W\)"),
    (lambda: weight_field(torch.rand(4, 4, 4)), r"w must be a float tensor \(K, D, H, W\)"),
    (lambda: weight_field(torch.rand(6, 2, 2, 2), torch.ones(6, 2, 2, 2)), "mask must be a bool tensor"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
