"""Decoder monitoring (SPEC §9): a closed-form ridge readout refitted on a rolling buffer.

:class:`RidgeDecoder` is ridge regression in closed form on standardised
features with a bias: one-hot targets and an argmax for labels, the vectors
themselves for regression. :class:`DecoderMonitor` keeps the last ``buffer``
(features, target) pairs seen in training, refits the decoder on them every
``every`` steps and scores it on held-out samples, timing itself so that its
share of the training time can be reported.
"""
from __future__ import annotations

import math
import numbers
import time
from typing import Optional

import torch

__all__ = ["RidgeDecoder", "DecoderMonitor"]


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
        >>> from cellkern.monitor import RidgeDecoder
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


class DecoderMonitor:
    """A ridge decoder refitted every ``every`` steps on the last ``buffer`` training samples.

    Use: ``observe`` the output-face features and targets of each training
    batch; when ``due(step)``, ``evaluate`` refits :class:`RidgeDecoder` on
    the buffer and returns its score on held-out features (accuracy for
    labels, R² for vectors). ``seconds`` is the wall time spent inside the
    monitor (observe + evaluate), for the overhead report; ``history`` holds
    ``(step, score)`` of every evaluation given a step.

    Args:
        every: evaluation period in steps (> 0). Default: 50.
        buffer: the rolling buffer's capacity in samples (> 0). Default: 512.
        alpha: the ridge penalty. Default: 1.0.
        n_classes: passed to the decoder. Default: None.

    Example:
        >>> import torch
        >>> from cellkern.monitor import DecoderMonitor
        >>> m = DecoderMonitor(every=10, buffer=64)
        >>> X = torch.randn(200, 4); y = (X[:, 1] > 0).long()
        >>> for b in range(0, 200, 20):
        ...     m.observe(X[b:b + 20], y[b:b + 20])
        >>> m.due(10), m.size
        (True, 64)
        >>> m.evaluate(X, y) > 0.9
        True
    """

    def __init__(self, every: int = 50, buffer: int = 512, alpha: float = 1.0, n_classes: Optional[int] = None):
        for name, v in (("every", every), ("buffer", buffer)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"DecoderMonitor: {name} must be a positive int, got {v!r}")
        self.every, self.capacity = int(every), int(buffer)
        self.decoder = RidgeDecoder(alpha, n_classes)
        self._x = self._y = None
        self._pos = 0  # next slot to write
        self.size = 0  # valid samples in the buffer
        self.seen = 0
        self.seconds = 0.0
        self.history = []

    def due(self, step: int) -> bool:
        """True at every positive multiple of ``every``."""
        return step > 0 and step % self.every == 0

    def observe(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        """Append a batch ``features [B, F]``, ``targets [B]`` (labels) or ``[B, d]``;
        the oldest samples drop out once ``buffer`` are held."""
        t0 = time.perf_counter()
        _check_xy("DecoderMonitor.observe", features, targets, F=None if self._x is None else self._x.shape[1])
        x, y = features.detach(), targets.detach()
        if self._y is not None and (y.shape[1:] != self._y.shape[1:] or y.is_floating_point() !=
                                    self._y.is_floating_point()):
            raise ValueError(f"DecoderMonitor.observe: targets must be shaped (B,{''.join(f' {d}' for d in self._y.shape[1:])}) "
                             f"like the first batch, got {tuple(y.shape)}")
        if self._x is None:
            self._x = x.new_empty((self.capacity, x.shape[1]), dtype=torch.float32)
            self._y = y.new_empty((self.capacity,) + tuple(y.shape[1:]))
        self.seen += x.shape[0]
        if x.shape[0] > self.capacity:
            x, y = x[-self.capacity:], y[-self.capacity:]
        n = x.shape[0]
        first = min(n, self.capacity - self._pos)
        self._x[self._pos:self._pos + first] = x[:first]
        self._y[self._pos:self._pos + first] = y[:first]
        if n > first:
            self._x[:n - first] = x[first:]
            self._y[:n - first] = y[first:]
        self._pos = (self._pos + n) % self.capacity
        self.size = min(self.capacity, self.size + n)
        self.seconds += time.perf_counter() - t0

    def contents(self) -> tuple:
        """The buffered ``(features, targets)``, oldest first."""
        if self.size < self.capacity:
            return self._x[:self.size], self._y[:self.size]
        order = torch.arange(self._pos, self._pos + self.capacity, device=self._x.device) % self.capacity
        return self._x[order], self._y[order]

    def evaluate(self, features: torch.Tensor, targets: torch.Tensor, step: Optional[int] = None) -> float:
        """Refit the decoder on the buffer and score it on held-out ``features``, ``targets``."""
        t0 = time.perf_counter()
        if self.size == 0:
            raise ValueError("DecoderMonitor.evaluate: the buffer is empty; observe training samples first")
        X, y = self.contents()
        score = self.decoder.fit(X, y).score(features, targets)
        if step is not None:
            self.history.append((int(step), score))
        self.seconds += time.perf_counter() - t0
        return score
