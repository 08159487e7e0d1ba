"""The lattice as a feature map: drive on the input face, features on the output face.

Input images are resampled onto the input face (z = 0) and drive channel c
with gain ``input_gain · (c + 1) / C`` (so the channels see one image at
different strengths and saturate differently under tanh). A presentation
starts from the zero state and runs ``T`` propagation steps; the features are
the output face (z = D−1) average-pooled to ``POOL × POOL`` per channel.

:func:`lattice_features` runs presentations without plasticity (the final
quality comparison); the trainer uses :func:`drive` and :func:`face_features`
on its own training presentations, so the monitor costs no extra propagation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ops

__all__ = ["POOL", "drive", "face_features", "lattice_features", "BOUNDARY", "PrequentialDecoder"]

#: the output face is average-pooled to POOL × POOL per channel
POOL = 8
#: z carries the input → output direction and must not wrap; x, y wrap
BOUNDARY = ("zero", "periodic", "periodic")


def drive(faces: torch.Tensor, channels: int, depth: int, gain: float) -> torch.Tensor:
    """The external drive ``[B, C, D, H, W]``: ``faces`` ``[B, H, W]`` on z = 0, zero elsewhere."""
    B, H, W = faces.shape
    x = faces.new_zeros(B, channels, depth, H, W)
    g = gain * torch.arange(1, channels + 1, dtype=faces.dtype, device=faces.device) / channels
    x[:, :, 0] = g.view(1, -1, 1, 1) * faces[:, None]
    return x


def face_features(s: torch.Tensor) -> torch.Tensor:
    """``[B, C·POOL·POOL]`` features of the output face of ``s`` ``[B, C, D, H, W]``."""
    face = s[:, :, -1].to(torch.float32)
    return F.adaptive_avg_pool2d(face, (min(POOL, face.shape[-2]), min(POOL, face.shape[-1]))).flatten(1)


@torch.no_grad()
def lattice_features(faces: torch.Tensor, w, mask, *, channels: int, steps: int, gain: float, leak: float,
                     stencil: str, chunk: int) -> torch.Tensor:
    """Features of every image in ``faces`` ``[N, H, W]`` (already on the face
    grid): a presentation of ``steps`` propagation steps each, ``chunk`` images at a time."""
    D = w.shape[1]
    out = []
    for i in range(0, faces.shape[0], chunk):
        x = drive(faces[i:i + chunk], channels, D, gain)
        s = torch.zeros_like(x)
        for _ in range(steps):
            s = ops.propagate(s, w, mask, x=x, leak=leak, activation="tanh", stencil=stencil, boundary=BOUNDARY)
        out.append(face_features(s))
    return torch.cat(out)


class PrequentialDecoder:
    """The monitor's ridge readout on a rolling buffer (SPEC §9).

    Training presentations add (features, label) pairs. At each monitor point
    the decoder fitted at the previous point scores the pairs that arrived
    since — samples it never saw, hence held out — and is then refitted on
    the last ``buffer`` pairs. The first point only fits (accuracy None).
    """

    def __init__(self, buffer: int = 512, alpha: float = 1.0, n_classes=None):
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
        from .monitor import RidgeDecoder

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
        from .monitor import RidgeDecoder

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
