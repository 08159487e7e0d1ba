"""The channel-mixing lattice of SPEC §11 and its competitive Hebbian rule, in plain torch.

A small, self-contained model for :mod:`benchmarks.quality` (the fair comparison of
SPEC §12). It follows the SPEC's math exactly, so that the lead can swap its three
kernels for the fused ``ck.ops`` mixing ops when they land:

- :func:`gather` + :func:`aggregate` — ``a[b,o,i] = Σ_k m[k,i] Σ_c W[k,o,c,i] s[b,c,nbr(i,k)]``
  (the ``aggregate`` op with 6-d weights);
- :meth:`MixingLattice.step` — ``s' = (1-α)s + α φ(a + x + bias)`` (``propagate``);
- :func:`competitive_hebbian_step_` — SPEC §11's rule, in place on ``W`` and ``β``:

      p[b,o,i]    = softmax_o((u[b,o,i] + β[o,i]) / τ)        (τ = 0: hard WTA, one-hot argmax)
      ΔW[k,o,c,i] = η_o,i / n[o,i] · Σ_b p[b,o,i] (s[b,c,nbr(i,k)] − u[b,o,i] W[k,o,c,i])
      β[o,i]     ← β[o,i] − η_β (mean_b p[b,o,i] − 1/C_out)

  with ``u = aggregate(s, W)`` (no drive, no bias), ``n = B`` (``average="batch"``) or
  ``n = 1 + Σ_b p`` (``average="wins"``), and masked or out-of-lattice synapses never
  changed. ``η_o,i = η`` (``rate="const"``, the SPEC) or, as an extension searched by the
  benchmark, ``η · |‖W[:,o,:,i]‖ − 1|^½`` (``rate="norm"``, SoftHebb's per-unit adaptive
  rate, Journé et al. 2023).

Everything is float32 on the CPU by default; shapes follow SPEC §1/§11:
state ``(B, C, D, H, W)``, weights ``(K, C_out, C_in, D, H, W)``, thresholds ``(C, D, H, W)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from cellkern.stencil import Stencil, parse_boundary, stencil as make_stencil

__all__ = [
    "ACTIVATIONS",
    "LatticeSpec",
    "MixingLattice",
    "resolve_stencil",
    "gather",
    "aggregate",
    "in_lattice_mask",
    "competitive_hebbian_step_",
    "init_weights",
]


def _triangle(u: torch.Tensor) -> torch.Tensor:
    """SPEC §11 ``triangle``: ``relu(u[o] − mean_c u[c])`` over the cell's channels (dim 1)."""
    return torch.relu(u - u.mean(dim=1, keepdim=True))


ACTIVATIONS = {
    "identity": lambda u: u,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "triangle": _triangle,
}


def resolve_stencil(name) -> Stencil:
    """A cellkern stencil, plus two feed-forward shorthands used by the benchmark.

    ``"ff"``: the 9 offsets with ``dz = −1``, ``|dy|, |dx| ≤ 1`` (a cell reads the 3×3 block of
    the slice below it); ``"ff5"``: the 25 offsets with ``dz = −1``, ``|dy|, |dx| ≤ 2``.
    Anything else goes to :func:`cellkern.stencil.stencil` (``"moore"``, ``"radius(2)"``, a list).
    """
    if isinstance(name, str) and name in ("ff", "ff5"):
        r = 1 if name == "ff" else 2
        return make_stencil([(-1, dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)])
    return make_stencil(name)


def _shift(t: torch.Tensor, offset, periodic) -> torch.Tensor:
    """``out[..., z, y, x] = t[..., z+dz, y+dy, x+dx]``; 0 outside a zero boundary, wrapped on a periodic axis."""
    out = t
    nd = t.dim()
    for a in range(3):
        d = offset[a]
        if d == 0:
            continue
        dim = nd - 3 + a
        n = t.shape[dim]
        if periodic[a]:
            out = torch.roll(out, shifts=-d, dims=dim)
        else:
            if abs(d) >= n:
                out = torch.zeros_like(out)
                continue
            body = out.narrow(dim, d, n - d) if d > 0 else out.narrow(dim, 0, n + d)
            pad_shape = list(out.shape)
            pad_shape[dim] = abs(d)
            pad = out.new_zeros(pad_shape)
            out = torch.cat([body, pad], dim) if d > 0 else torch.cat([pad, body], dim)
    return out


def in_lattice_mask(dims, st: Stencil, periodic) -> torch.Tensor:
    """Bool ``(K, D, H, W)``: False where ``nbr(i, k)`` lies outside a zero boundary."""
    ones = torch.ones(tuple(dims))
    return torch.stack([_shift(ones, o, periodic) > 0 for o in st.offset_tuples])


def gather(s: torch.Tensor, st: Stencil, periodic) -> torch.Tensor:
    """``S[b,k,c,i] = s[b,c,nbr(i,k)]`` as ``(B, K, C, D, H, W)`` (0 outside a zero boundary)."""
    return torch.stack([_shift(s, o, periodic) for o in st.offset_tuples], dim=1)


def aggregate(S: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``a[b,o,i] = Σ_k Σ_c W[k,o,c,i] S[b,k,c,i]`` for gathered neighbours ``S`` (see :func:`gather`).

    Out-of-lattice neighbours read 0 in ``S``, so they contribute nothing whatever ``W`` holds
    there (SPEC §2). A pruning mask would multiply ``W`` here; the benchmark prunes nothing.
    """
    K, O, C = W.shape[:3]
    B = S.shape[0]
    N = S.shape[-3] * S.shape[-2] * S.shape[-1]
    # (N, B, K*C) x (N, K*C, O) -> (N, B, O): one small matmul per cell
    Sx = S.reshape(B, K * C, N).permute(2, 0, 1)
    Wx = W.reshape(K, O, C, N).permute(3, 0, 2, 1).reshape(N, K * C, O)
    return torch.bmm(Sx, Wx).permute(1, 2, 0).reshape((B, O) + tuple(S.shape[-3:]))


def init_weights(K: int, C: int, dims, gain: float, generator: torch.Generator, live: torch.Tensor | None = None):
    """SPEC §11 initialisation: zero-mean normal, std ``gain / sqrt(K · C_in)``.

    ``live`` (bool ``(K, D, H, W)``): synapses outside it are set to 0 (they are never read
    and never updated, so this only keeps reports of |ΔW| honest).
    """
    W = torch.randn((K, C, C) + tuple(dims), generator=generator) * (gain / math.sqrt(K * C))
    if live is not None:
        W = W * live[:, None, None].to(W.dtype)
    return W


def competitive_hebbian_step_(W, S, beta, *, eta, tau, eta_beta, average="wins", plastic=None,
                              rate="const"):
    """SPEC §11's competitive Hebbian update, in place on ``W`` ``(K, C, C, D, H, W)`` and ``beta``.

    Args:
        W: mixing weights; updated in place.
        S: the gathered presynaptic state ``(B, K, C, D, H, W)`` (:func:`gather` of ``s``).
        beta: per-unit thresholds ``(C, D, H, W)``; updated in place (after ``W``).
        eta, eta_beta: learning rates of the weights and of the thresholds.
        tau: softmax temperature; ``0`` means hard winner-take-all (one-hot argmax).
        average: ``"wins"`` (``n = 1 + Σ_b p``) or ``"batch"`` (``n = B``).
        plastic: bool ``(K, D, H, W)``: the synapses allowed to change (in-lattice ∧ unpruned ∧
            the layers being trained). ``None``: all (the caller masks out-of-lattice ones).
        rate: ``"const"`` (SPEC) or ``"norm"`` (η · |‖W_o‖ − 1|^½ per unit, SoftHebb).

    Returns:
        ``(u, p)``: the aggregate and the soft (or hard) wins, both ``(B, C, D, H, W)``.
    """
    u = aggregate(S, W)
    z = u + beta[None]
    if tau > 0:
        p = torch.softmax(z / tau, dim=1)
    else:
        p = torch.zeros_like(z).scatter_(1, z.argmax(dim=1, keepdim=True), 1.0)
    B = S.shape[0]
    # Σ_b p[b,o,i] s[b,c,nbr(i,k)]  and  Σ_b p u, per unit
    K, O, C = W.shape[:3]
    N = W.shape[-3] * W.shape[-2] * W.shape[-1]
    Px = p.reshape(B, O, N).permute(2, 1, 0)                                   # (N, O, B)
    Sx = S.reshape(B, K * C, N).permute(2, 0, 1)                               # (N, B, K*C)
    hebb = torch.bmm(Px, Sx).reshape(N, O, K, C).permute(2, 1, 3, 0).reshape(W.shape)
    pu = (p * u).sum(0)                                                        # (O, D, H, W)
    dW = hebb - pu[None, :, None] * W
    if average == "wins":
        n = 1.0 + p.sum(0)
    elif average == "batch":
        n = torch.full_like(pu, float(B))
    else:
        raise ValueError(f"competitive_hebbian_step_: average must be 'wins' or 'batch', got {average!r}")
    lr = eta / n                                                               # (O, D, H, W)
    if rate == "norm":
        norm = W.pow(2).sum(dim=(0, 2)).sqrt()                                 # (O, D, H, W)
        lr = lr * (norm - 1.0).abs().clamp_min(1e-3).sqrt()
    elif rate != "const":
        raise ValueError(f"competitive_hebbian_step_: rate must be 'const' or 'norm', got {rate!r}")
    dW = dW * lr[None, :, None]
    if plastic is not None:
        dW = dW * plastic[:, None, None].to(dW.dtype)
    W.add_(dW)
    if eta_beta:
        db = p.mean(0) - 1.0 / O
        if plastic is not None:
            db = db * plastic.any(0)[None].to(db.dtype)
        beta.sub_(eta_beta * db)
    return u, p


@dataclass
class LatticeSpec:
    """The architecture and presentation of a mixing lattice (everything the twin shares).

    Attributes:
        C: channels per cell (units competing in a cell).
        D: lattice depth; the image drives channel 0 of the input face ``z = 0``; ``H, W`` are the
            image's own size (native resolution, no upsampling).
        stencil: ``"ff"``, ``"ff5"`` or a cellkern stencil name (see :func:`resolve_stencil`).
        boundary: SPEC §1 boundary, ``"zero"`` by default.
        steps: steps per presentation (``None``: ``D``, just enough for the drive to reach the
            far face along a feed-forward stencil).
        leak: α of ``s' = (1-α)s + α φ(...)``.
        activation: one of :data:`ACTIVATIONS`.
        gain: weight init gain g (std ``g / sqrt(K·C)``).
        drive_gain: the drive is ``drive_gain · image`` in channel 0 of ``z = 0``.
        center: subtract the plasticity images' mean pixel image from every image first.
        norm: ``"none"`` or ``"cell"``: after φ, every cell's channel vector in the slices ``z ≥ 1``
            is divided by ``1e-6 + ‖φ(·)_cell‖₂`` (depth with normalisation; not a SPEC §2 op —
            a searched option, and the twin gets the same transfer).
        beta_in_forward: add the homeostatic thresholds β to the forward pass as a bias.
    """

    C: int = 8
    D: int = 2
    stencil: str = "ff"
    boundary: str = "zero"
    steps: int | None = None
    leak: float = 1.0
    activation: str = "triangle"
    gain: float = 1.0
    drive_gain: float = 1.0
    center: bool = False
    norm: str = "none"
    beta_in_forward: bool = False

    def validate(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"LatticeSpec: activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.norm not in ("none", "cell"):
            raise ValueError(f"LatticeSpec: norm must be 'none' or 'cell', got {self.norm!r}")
        if self.C < 1 or self.D < 2:
            raise ValueError(f"LatticeSpec: need C >= 1 and D >= 2, got C={self.C}, D={self.D}")


class MixingLattice:
    """A mixing lattice (SPEC §11) driven by images on its input face.

    ``W`` ``(K, C, C, D, H, W)`` and ``beta`` ``(C, D, H, W)`` are plain tensors; the trained
    lattice and its twin are two instances built from the same ``W0``.
    """

    def __init__(self, spec: LatticeSpec, image_hw, W0: torch.Tensor, mean_image: torch.Tensor | None = None):
        spec.validate()
        self.spec = spec
        self.st = resolve_stencil(spec.stencil)
        self.periodic = tuple(b == "periodic" for b in parse_boundary(spec.boundary))
        self.dims = (spec.D,) + tuple(image_hw)
        self.live = in_lattice_mask(self.dims, self.st, self.periodic)          # (K, D, H, W)
        self.W = W0.clone()
        self.beta = torch.zeros((spec.C,) + self.dims)
        self.act = ACTIVATIONS[spec.activation]
        self.mean_image = mean_image
        self.steps = spec.steps if spec.steps is not None else spec.D

    # -- forward ---------------------------------------------------------------------------
    def drive(self, img: torch.Tensor) -> torch.Tensor:
        """``(B, H, W)`` images → drive ``(B, C, D, H, W)``: channel 0 of the face ``z = 0``."""
        if self.spec.center and self.mean_image is not None:
            img = img - self.mean_image
        x = img.new_zeros((img.shape[0], self.spec.C) + self.dims)
        x[:, 0, 0] = img * self.spec.drive_gain
        return x

    def step(self, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """One SPEC §2 ``propagate`` update with mixing weights (plus the optional cell norm)."""
        a = aggregate(gather(s, self.st, self.periodic), self.W) + x
        if self.spec.beta_in_forward:
            a = a + self.beta[None]
        new = self.act(a)
        if self.spec.norm == "cell":
            n = new[:, :, 1:].pow(2).sum(1, keepdim=True).sqrt()
            new = torch.cat([new[:, :, :1], new[:, :, 1:] / (n + 1e-6)], dim=2)
        alpha = self.spec.leak
        return (1 - alpha) * s + alpha * new

    def run(self, img: torch.Tensor, keep: int = 1):
        """Present images for ``steps`` steps from a zero state; return the last ``keep`` states."""
        x = self.drive(img)
        s = torch.zeros_like(x)
        out = []
        for t in range(self.steps):
            s = self.step(s, x)
            if t >= self.steps - keep:
                out.append(s)
        return out
