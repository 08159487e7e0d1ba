"""The readout and the decoder monitor (SPEC §9, §12).

The lattice as a feature map: input images drive the input face (z = 0),
channel c with gain ``input_gain · (c + 1) / C`` (so the channels see one
image at different strengths and saturate differently under tanh). A
presentation starts from the zero state and runs ``T`` propagation steps;
the features are the output face (z = D−1) average-pooled to ``POOL × POOL``
per channel. :func:`lattice_features` runs presentations without plasticity
(the final quality comparison); the trainer uses :func:`drive` and
:func:`face_features` on its own training presentations, so the monitor
costs no extra propagation.

:class:`RidgeDecoder` is ridge regression in closed form on standardised
features with a bias: one-hot targets and an argmax for labels, the vectors
themselves for regression. :class:`PrequentialDecoder` is the monitor's
decoder: it scores each new batch of training presentations with the fit of
the previous monitor point (samples it never saw), then refits on a rolling buffer.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as functional

from .. import ops

__all__ = ["POOL", "BOUNDARY", "FEATURES", "DRIVES", "REACH", "drive", "read_region", "face_features", "Presentation",
           "lattice_features", "check_reach", "RidgeDecoder", "PrequentialDecoder"]


def _check_xy(op, X, y=None, F=None):
    if not isinstance(X, torch.Tensor) or X.dim() != 2 or X.shape[0] == 0 or not X.is_floating_point():
        raise ValueError(f"{op}: X must be a float tensor (n, F) with n >= 1, got "
                         f"{tuple(X.shape) if isinstance(X, torch.Tensor) else type(X).__name__}")
    if F is not None and X.shape[1] != F:
        raise ValueError(f"{op}: X must have {F} features (as in fit), got {X.shape[1]}")
    if y is None:
        return
    if not isinstance(y, torch.Tensor) or y.dim() not in (1, 2) or y.shape[0] != X.shape[0]:
        raise ValueError(f"{op}: y must be labels (n,) or vectors (n, d) with n = {X.shape[0]}, got "
                         f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    if y.dim() == 1 and (y.is_floating_point() or y.dtype == torch.bool or (y.numel() and int(y.min()) < 0)):
        raise ValueError(f"{op}: labels y (n,) must be integers >= 0 (vectors are (n, d) floats), got {y.dtype}")
    if y.dim() == 2 and not y.is_floating_point():
        raise ValueError(f"{op}: vector targets y (n, d) must be float, got {y.dtype}")


class RidgeDecoder:
    """Ridge regression in closed form: ``W = (ZᵀZ + αI)⁻¹ Zᵀ (Y − Ȳ)`` on the
    standardised features ``Z = (X − μ)/σ``, with bias ``Ȳ``; solved in fp64
    by ``torch.linalg.solve`` (the ``n × n`` dual system when n < F).

    Labels ``(n,)`` become one-hot targets and predictions are the argmax;
    vectors ``(n, d)`` are regressed directly.

    Args:
        alpha: α > 0, the ridge penalty. Default: 1.0.
        n_classes: the number of classes for labels. Default: None (largest label seen + 1).

    Example:
        >>> import torch
        >>> from cellkern.train.monitor import RidgeDecoder
        >>> X = torch.randn(100, 5); y = (X[:, 0] > 0).long()
        >>> RidgeDecoder(alpha=0.1).fit(X, y).score(X, y) > 0.9
        True
    """

    def __init__(self, alpha: float = 1.0, n_classes: Optional[int] = None):
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"RidgeDecoder: alpha must be a finite number > 0, got {alpha!r}")
        if n_classes is not None and (isinstance(n_classes, bool) or not isinstance(n_classes, numbers.Integral)
                                      or n_classes < 1):
            raise ValueError(f"RidgeDecoder: n_classes must be a positive int or None, got {n_classes!r}")
        self.alpha, self.n_classes = float(alpha), n_classes
        self.weight = self.bias = self.mean = self.scale = None
        self.labels = None

    def fit(self, X: torch.Tensor, y: torch.Tensor) -> "RidgeDecoder":
        """Fit on features ``X`` ``[n, F]`` and labels ``[n]`` (int) or vectors ``[n, d]`` (float)."""
        _check_xy("RidgeDecoder.fit", X, y)
        X64 = X.detach().to(torch.float64)
        self.labels = y.dim() == 1
        if self.labels:
            k = self.n_classes or int(y.max()) + 1
            if int(y.max()) >= k:
                raise ValueError(f"RidgeDecoder.fit: labels must be < n_classes = {k}, got {int(y.max())}")
            Y = torch.nn.functional.one_hot(y.detach().long(), k).to(X64)
        else:
            Y = y.detach().to(X64)
        self.mean = X64.mean(0)
        self.scale = X64.std(0, unbiased=False).clamp_min(1e-12)
        Z = (X64 - self.mean) / self.scale
        self.bias = Y.mean(0)
        Yc = Y - self.bias
        n, F = Z.shape
        if n < F:
            eye = torch.eye(n, dtype=Z.dtype, device=Z.device)
            self.weight = Z.T @ torch.linalg.solve(Z @ Z.T + self.alpha * eye, Yc)
        else:
            eye = torch.eye(F, dtype=Z.dtype, device=Z.device)
            self.weight = torch.linalg.solve(Z.T @ Z + self.alpha * eye, Z.T @ Yc)
        return self

    def _check_fitted(self, op):
        if self.weight is None:
            raise ValueError(f"RidgeDecoder.{op}: call fit first")

    def decision(self, X: torch.Tensor) -> torch.Tensor:
        """The linear outputs ``[n, classes or d]`` (fp64)."""
        self._check_fitted("decision")
        _check_xy("RidgeDecoder.decision", X, F=self.weight.shape[0])
        return ((X.detach().to(torch.float64) - self.mean) / self.scale) @ self.weight + self.bias

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        """Labels ``[n]`` (int64) for a label fit, else vectors ``[n, d]`` in the dtype of ``X``."""
        out = self.decision(X)
        return out.argmax(1) if self.labels else out.to(X.dtype)

    def score(self, X: torch.Tensor, y: torch.Tensor) -> float:
        """Accuracy for labels; for vectors ``R² = 1 − Σ(y − ŷ)² / Σ(y − ȳ)²`` over all outputs."""
        self._check_fitted("score")
        _check_xy("RidgeDecoder.score", X, y, F=self.weight.shape[0])
        if self.labels != (y.dim() == 1):
            raise ValueError(f"RidgeDecoder.score: y must be {'labels (n,)' if self.labels else 'vectors (n, d)'} "
                             f"as in fit, got shape {tuple(y.shape)}")
        if self.labels:
            return float((self.predict(X) == y.to(self.weight.device)).double().mean())
        y64 = y.detach().to(torch.float64)
        ss_res = float(((y64 - self.decision(X)) ** 2).sum())
        ss_tot = float(((y64 - y64.mean(0)) ** 2).sum())
        return 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)


#: the read region is average-pooled to POOL × POOL per channel
POOL = 8
#: z carries the input → output direction and must not wrap; x, y wrap
BOUNDARY = ("zero", "periodic", "periodic")
#: what a readout reads (SPEC §12): the output face at the end of the
#: presentation, every z-slice, or the output face averaged over its last half
FEATURES = ("face", "slices", "time")
#: how the image drives the input face: channel c at gain·(c+1)/C (the shared
#: model's gain-scaled copies) or channel 0 alone (the mixing model)
DRIVES = ("gain", "channel0")
#: a read region whose mean |s| stays below this has not been reached (SPEC §12)
REACH = 1e-3


def drive(faces: torch.Tensor, channels: int, depth: int, gain: float, mode: str = "gain") -> torch.Tensor:
    """The external drive ``[B, C, D, H, W]``: ``faces`` ``[B, H, W]`` on z = 0, zero elsewhere."""
    B, H, W = faces.shape
    x = faces.new_zeros(B, channels, depth, H, W)
    if mode == "channel0":
        x[:, 0, 0] = gain * faces
        return x
    g = gain * torch.arange(1, channels + 1, dtype=faces.dtype, device=faces.device) / channels
    x[:, :, 0] = g.view(1, -1, 1, 1) * faces[:, None]
    return x


def _pool(t: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` average-pooled to at most POOL × POOL, flattened."""
    t = t.to(torch.float32)
    return functional.adaptive_avg_pool2d(t, (min(POOL, t.shape[-2]), min(POOL, t.shape[-1]))).flatten(1)


def read_region(s: torch.Tensor, features: str) -> torch.Tensor:
    """The part of ``s`` ``[B, C, D, H, W]`` a readout of kind ``features`` reads."""
    return s if features == "slices" else s[:, :, -1]


def face_features(s: torch.Tensor, features: str = "face") -> torch.Tensor:
    """``[B, F]`` features of ``s`` ``[B, C, D, H, W]``: the output face (``face``;
    ``time`` passes the face's running mean as ``s``) or every z-slice
    (``slices``), pooled to POOL × POOL per channel."""
    if features == "slices":
        return torch.cat([_pool(s[:, :, z]) for z in range(s.shape[2])], dim=1)
    return _pool(s[:, :, -1])


class Presentation:
    """What one presentation of ``steps`` propagation steps reads (SPEC §12):
    the reach step (the first step, counted from 1, at which the read region's
    mean |s| exceeds :data:`REACH`; None while it has not) and, for
    ``features="time"``, the running mean of the output face over the last
    ``⌈steps/2⌉`` steps."""

    def __init__(self, steps: int, features: str):
        self.steps, self.features = int(steps), features
        self.t, self.reach, self.sum, self.n = 0, None, None, 0

    def observe(self, s: torch.Tensor) -> None:
        """Account for the state ``s`` after one more step."""
        self.t += 1
        if self.reach is None and float(read_region(s, self.features).abs().mean()) > REACH:
            self.reach = self.t
        if self.features == "time" and self.t > self.steps // 2:
            self.sum = s.to(torch.float32) if self.sum is None else self.sum + s
            self.n += 1

    def features_of(self, s: torch.Tensor) -> torch.Tensor:
        """The features at the end of the presentation (``s`` its last state)."""
        if self.features == "time":
            return face_features(self.sum / max(self.n, 1))
        return face_features(s, self.features)


@torch.no_grad()
def lattice_features(faces: torch.Tensor, w, mask, *, channels: int, steps: int, gain: float, leak: float,
                     stencil: str, chunk: int, activation: str = "tanh", features: str = "face",
                     drive_mode: str = "gain") -> tuple:
    """``(features, reach_step)`` of every image in ``faces`` ``[N, H, W]``
    (already on the face grid): a presentation of ``steps`` propagation steps
    each, ``chunk`` images at a time; ``reach_step`` is the latest reach of
    the chunks (None if one never reached the read region)."""
    D = w.shape[-3]
    out, reach = [], 0
    for i in range(0, faces.shape[0], chunk):
        x = drive(faces[i:i + chunk], channels, D, gain, drive_mode)
        s = torch.zeros_like(x)
        pres = Presentation(steps, features)
        for _ in range(steps):
            s = ops.propagate(s, w, mask, x=x, leak=leak, activation=activation, stencil=stencil, boundary=BOUNDARY)
            pres.observe(s)
        out.append(pres.features_of(s))
        reach = None if reach is None or pres.reach is None else max(reach, pres.reach)
    return torch.cat(out), reach


def check_reach(where: str, max_abs_feature: float, reach_step, steps: int) -> None:
    """The SPEC §12 check: a readout whose features stay below :data:`REACH`
    (or whose read region the signal never reached within the presentation)
    is an error, never a result."""
    if reach_step is None:
        raise ValueError(
            f"{where}: the readout reads noise: the read region's mean |s| never exceeds {REACH:g} within the "
            f"presentation of {steps} steps (the largest |feature| read is {max_abs_feature:.3g}); lengthen "
            "present_steps, shorten the lattice's depth, raise input_gain or the weights, or read features = \"slices\"")
    if max_abs_feature < REACH:
        raise ValueError(f"{where}: the readout reads noise: the largest |feature| is {max_abs_feature:.3g} "
                         f"< {REACH:g}; raise input_gain or the weights")


class PrequentialDecoder:
    """The monitor's ridge readout on a rolling buffer (SPEC §9).

    Training presentations add (features, label) pairs. At each monitor point
    the decoder fitted at the previous point scores the pairs that arrived
    since — samples it never saw, hence held out — and is then refitted on
    the last ``buffer`` pairs. The first point only fits (accuracy None).
    """

    def __init__(self, buffer: int = 512, alpha: float = 1.0, n_classes=None):
        if isinstance(buffer, bool) or not isinstance(buffer, numbers.Integral) or buffer < 1:
            raise ValueError(f"PrequentialDecoder: buffer must be a positive int, got {buffer!r}")
        RidgeDecoder(alpha, n_classes)  # checks alpha and n_classes
        self.buffer, self.alpha, self.n_classes = int(buffer), float(alpha), n_classes
        self.x: list = []
        self.y: list = []
        self.new = 0
        self.decoder = None

    def observe(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        self.x.append(feats.detach().to(torch.float32).cpu())
        self.y.append(labels.detach().cpu())
        self.new += feats.shape[0]
        n = sum(t.shape[0] for t in self.x)
        while self.x and n - self.x[0].shape[0] >= self.buffer:
            n -= self.x.pop(0).shape[0]
            self.y.pop(0)

    _FIT = ("weight", "bias", "mean", "scale", "labels")

    def state_dict(self) -> dict:
        """The decoder as data (numbers, lists of tensors, the fitted ridge's
        tensors), for a checkpoint that loads with ``weights_only=True``."""
        fit = None if self.decoder is None else {k: getattr(self.decoder, k) for k in self._FIT}
        return dict(buffer=self.buffer, alpha=self.alpha, n_classes=self.n_classes, x=list(self.x), y=list(self.y),
                    new=self.new, decoder=fit)

    @classmethod
    def from_state_dict(cls, d: dict) -> "PrequentialDecoder":
        """The decoder :meth:`state_dict` describes."""
        dec = cls(d["buffer"], d["alpha"], d["n_classes"])
        dec.x, dec.y, dec.new = list(d["x"]), list(d["y"]), int(d["new"])
        if d["decoder"] is not None:
            dec.decoder = RidgeDecoder(alpha=dec.alpha, n_classes=dec.n_classes)
            for k in cls._FIT:
                setattr(dec.decoder, k, d["decoder"][k])
        return dec

    def evaluate(self) -> tuple:
        """``(accuracy, n)``: the previous fit's held-out accuracy on the ``n``
        new samples (None, 0 without a previous fit or new samples); then refit."""
        if not self.x:
            return None, 0
        X, Y = torch.cat(self.x), torch.cat(self.y)
        acc, k = None, 0
        if self.decoder is not None and self.new > 0:
            k = min(self.new, X.shape[0])
            acc = float(self.decoder.score(X[-k:], Y[-k:]))
        if torch.unique(Y).numel() > 1:
            self.decoder = RidgeDecoder(alpha=self.alpha, n_classes=self.n_classes).fit(X, Y)
        self.new = 0
        return acc, k
