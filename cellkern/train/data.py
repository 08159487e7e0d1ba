"""Image data for the staged schedule: scikit-learn's digits, IDX files, and the input face.

* :func:`load_digits` — the 1 797 8×8 handwritten digits bundled with
  scikit-learn (no download), split per class with a seed;
* :func:`load_idx` — MNIST-family IDX files (``train-images-idx3-ubyte``,
  optionally ``.gz``), the format's own train/test files or a seeded split;
* :func:`to_face` — images resampled onto the lattice's input face (H, W).

Every loader returns a :class:`Dataset`: images ``float32`` in [0, 1], labels ``int64``.
"""
from __future__ import annotations

import gzip
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Dataset", "load_digits", "load_idx", "to_face", "read_idx"]


@dataclass
class Dataset:
    """A labelled image set, split into train and test.

    Attributes:
        train_x, test_x: images ``[N, h, w]``, float32 in [0, 1].
        train_y, test_y: labels ``[N]``, int64 in ``[0, n_classes)``.
        n_classes: the number of classes (largest label + 1).
        name: where it came from.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    n_classes: int
    name: str


def _check_fraction(op, test_fraction):
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real) or not 0 < test_fraction < 1:
        raise ValueError(f"{op}: test_fraction must be a number in (0, 1), got {test_fraction!r}")
    return float(test_fraction)


def _check_seed(op, seed):
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"{op}: seed must be an int >= 0, got {seed!r}")
    return int(seed)


def stratified_split(y: np.ndarray, test_fraction: float, seed: int):
    """Indices ``(train, test)``: from each class, ``round(test_fraction · n_c)``
    random samples go to test (at least one when the class has two or more);
    both index lists are shuffled with the same seeded generator."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n = int(round(test_fraction * len(idx)))
        n = min(max(n, 1 if len(idx) > 1 else 0), len(idx) - 1 if len(idx) > 1 else len(idx))
        test.append(idx[:n])
        train.append(idx[n:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _dataset(x_tr, y_tr, x_te, y_te, name):
    n_classes = int(max(y_tr.max(initial=-1), y_te.max(initial=-1))) + 1
    t = lambda a, dt: torch.from_numpy(np.ascontiguousarray(a)).to(dt)  # noqa: E731
    return Dataset(t(x_tr, torch.float32), t(y_tr, torch.int64), t(x_te, torch.float32), t(y_te, torch.int64),
                   n_classes, name)


def load_digits(seed: int = 0, test_fraction: float = 0.25) -> Dataset:
    """scikit-learn's bundled 8×8 digits (1 797 images, 10 classes), no download.

    Pixels (0–16) are divided by 16. The split is stratified: each class puts
    ``round(test_fraction · n_c)`` of its images, chosen with ``seed``, in test.

    Args:
        seed: the split's seed. Default: 0.
        test_fraction: the share of each class held out, in (0, 1). Default: 0.25.

    Returns:
        a :class:`Dataset` with images ``[N, 8, 8]``.

    Example:
        >>> from cellkern.train.data import load_digits
        >>> d = load_digits()
        >>> tuple(d.train_x.shape), tuple(d.test_x.shape), d.n_classes
        ((1347, 8, 8), (450, 8, 8), 10)
    """
    op = "load_digits"
    seed, frac = _check_seed(op, seed), _check_fraction(op, test_fraction)
    from sklearn.datasets import load_digits as _sk_digits

    bunch = _sk_digits()
    x = bunch.images.astype(np.float32) / 16.0
    y = bunch.target.astype(np.int64)
    tr, te = stratified_split(y, frac, seed)
    return _dataset(x[tr], y[tr], x[te], y[te], "digits")


_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _open(path):
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _read_at_most(fh, nbytes: int, chunk: int = 1 << 24) -> bytes:
    """``nbytes`` from ``fh``, or fewer at the end of the file, in chunks: a
    header that announces more data than the file holds must not allocate it."""
    parts, left = [], nbytes
    while left > 0:
        part = fh.read(min(left, chunk))
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def read_idx(path, limit: Optional[int] = None) -> np.ndarray:
    """One IDX file (plain or gzip, told apart by its first bytes) as an array.

    The header is two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B
    int16, 0x0C int32, 0x0D float32, 0x0E float64), the number of dims, then
    each dim as a big-endian int32; the data follows, big-endian.

    Args:
        path: the file.
        limit: read at most this many items along the first dim. Default: all.

    Raises:
        ValueError: a bad magic number or a size that does not match the header.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"read_idx: path must be an existing file, got {str(path)!r}")
    with _open(path) as fh:
        head = fh.read(4)
        if len(head) < 4 or head[:2] != b"\x00\x00" or head[2] not in _IDX_TYPES or head[3] == 0:
            raise ValueError(f"read_idx: {path.name} is not an IDX file: the magic number must be "
                             f"00 00 <type in {', '.join(f'{k:02x}' for k in _IDX_TYPES)}> <ndim >= 1>, "
                             f"got {head.hex(' ') or 'an empty file'}")
        dtype, ndim = np.dtype(_IDX_TYPES[head[2]]), head[3]
        raw = fh.read(4 * ndim)
        if len(raw) < 4 * ndim:
            raise ValueError(f"read_idx: {path.name}: the header announces {ndim} dims but the file ends early")
        shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">i4"))
        if min(shape) < 0:
            raise ValueError(f"read_idx: {path.name}: the header announces negative dims {shape}")
        n = shape[0] if limit is None else min(shape[0], int(limit))
        count = n * math.prod(shape[1:])
        data = _read_at_most(fh, count * dtype.itemsize)
        if len(data) != count * dtype.itemsize or (n == shape[0] and fh.read(1)):
            raise ValueError(f"read_idx: {path.name}: shape {shape} of {dtype} needs "
                             f"{int(np.prod(shape, dtype=np.int64)) * dtype.itemsize} data bytes; the file holds "
                             f"{'fewer' if len(data) != count * dtype.itemsize else 'more'}")
    return np.frombuffer(data, dtype=dtype).reshape((n,) + shape[1:]).astype(dtype.newbyteorder("="))


def _labels_path(images_path) -> Path:
    """``train-images-idx3-ubyte[.gz]`` → ``train-labels-idx1-ubyte[.gz]``."""
    p = Path(images_path)
    name = p.name.replace("images", "labels").replace("idx3", "idx1")
    if name == p.name:
        raise ValueError(f"load_idx: labels_path is needed: no labels file follows from the name {p.name!r}")
    return p.with_name(name)


def _scale(x: np.ndarray) -> np.ndarray:
    """Pixels to float32 in [0, 1]: uint8 / 255; other types by their range."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    x = x.astype(np.float32)
    lo, hi = float(x.min(initial=0.0)), float(x.max(initial=0.0))
    if lo >= 0.0 and hi <= 1.0:
        return x
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def _pair(op, images_path, labels_path, limit):
    x = read_idx(images_path, limit)
    y = read_idx(labels_path if labels_path is not None else _labels_path(images_path), limit)
    if x.ndim != 3:
        raise ValueError(f"{op}: {Path(images_path).name} must hold images (N, h, w), got shape {x.shape}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{op}: labels must be integers (N,), got shape {y.shape} of {y.dtype}")
    if len(y) != len(x):
        raise ValueError(f"{op}: {Path(images_path).name} holds {len(x)} images but its labels {len(y)}")
    if len(x) == 0:
        raise ValueError(f"{op}: {Path(images_path).name} holds no images")
    if len(y) and y.min() < 0:
        raise ValueError(f"{op}: labels must be >= 0, got {int(y.min())}")
    return _scale(x), y.astype(np.int64)


def load_idx(images_path, labels_path=None, *, test_images=None, test_labels=None, seed: int = 0,
             test_fraction: float = 0.25, limit: Optional[int] = None) -> Dataset:
    """MNIST-family IDX files (plain or ``.gz``) as a :class:`Dataset`.

    Args:
        images_path: images ``(N, h, w)``.
        labels_path: labels ``(N,)``. Default: the images' name with
            ``images`` → ``labels`` and ``idx3`` → ``idx1`` (MNIST's naming).
        test_images, test_labels: a separate test set (labels found the same
            way). Default: None — a stratified split of the training files.
        seed, test_fraction: the split (when no test files). Default: 0, 0.25.
        limit: read at most this many samples of each file. Default: all.

    Images: uint8 pixels / 255; other types scaled by their range into [0, 1].

    Example:
        >>> from cellkern.train.data import load_idx
        >>> d = load_idx("train-images-idx3-ubyte.gz", limit=10000)  # doctest: +SKIP
    """
    op = "load_idx"
    seed, frac = _check_seed(op, seed), _check_fraction(op, test_fraction)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1):
        raise ValueError(f"{op}: limit must be a positive int or None, got {limit!r}")
    x, y = _pair(op, images_path, labels_path, limit)
    if test_images is not None:
        xt, yt = _pair(op, test_images, test_labels, limit)
        if xt.shape[1:] != x.shape[1:]:
            raise ValueError(f"{op}: test images must be {x.shape[1:]} like the training images, got {xt.shape[1:]}")
    elif test_labels is not None:
        raise ValueError(f"{op}: test_labels needs test_images")
    else:
        tr, te = stratified_split(y, frac, seed)
        if len(tr) == 0 or len(te) == 0:
            raise ValueError(f"{op}: {len(y)} images of {len(np.unique(y))} classes are too few to split into "
                             f"training and test images by class; give more images or test_images")
        x, y, xt, yt = x[tr], y[tr], x[te], y[te]
    name = os.path.basename(str(images_path)).split(".")[0]
    return _dataset(x, y, xt, yt, name)


def to_face(images, H: int, W: int) -> torch.Tensor:
    """Images resampled onto the input face: bilinear, ``align_corners=False``.

    Args:
        images: ``[N, h, w]`` (tensor or array).
        H, W: the face's size (the lattice's H and W).

    Returns:
        ``[N, H, W]`` float32.

    Example:
        >>> import torch
        >>> from cellkern.train.data import to_face
        >>> to_face(torch.ones(2, 8, 8), 16, 12).shape
        torch.Size([2, 16, 12])
    """
    op = "to_face"
    for n, v in (("H", H), ("W", W)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{op}: {n} must be a positive int, got {v!r}")
    x = images if isinstance(images, torch.Tensor) else torch.as_tensor(images, device="cpu")
    if x.dim() != 3 or x.numel() == 0:
        raise ValueError(f"{op}: images must have shape (N, h, w) with no empty dim, got {tuple(x.shape)}")
    x = x.to(torch.float32)
    if tuple(x.shape[1:]) == (H, W):
        return x.clone()
    return F.interpolate(x[:, None], size=(int(H), int(W)), mode="bilinear", align_corners=False)[:, 0]
