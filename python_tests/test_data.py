"""Data loaders: scikit-learn digits, IDX files (plain and gzip), the input face."""
import gzip
import struct

import numpy as np
import pytest
import torch

from cellkern.train.data import load_digits, load_idx, read_idx, stratified_split, to_face


def write_idx(path, array, code=0x08, gz=False):
    a = np.asarray(array)
    dt = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    data = bytes([0, 0, code, a.ndim]) + struct.pack(f">{a.ndim}i", *a.shape) + a.astype(dt).tobytes()
    with (gzip.open if gz else open)(path, "wb") as fh:
        fh.write(data)
    return path


@pytest.fixture
def mnist_like(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(40, 6, 5), dtype=np.uint8)
    y = np.repeat(np.arange(4), 10)
    xt, yt = rng.integers(0, 256, size=(12, 6, 5), dtype=np.uint8), np.arange(12) % 4
    return tmp_path, x, y, xt, yt


def test_digits_shapes_range_and_stratified_split():
    d = load_digits(seed=0, test_fraction=0.25)
    assert d.name == "digits" and d.n_classes == 10
    assert d.train_x.dtype == torch.float32 and d.train_y.dtype == torch.int64
    assert d.train_x.shape[1:] == (8, 8) and len(d.train_x) + len(d.test_x) == 1797
    assert float(d.train_x.min()) == 0.0 and float(d.train_x.max()) == 1.0
    counts = torch.bincount(d.test_y, minlength=10).float() / torch.bincount(
        torch.cat([d.train_y, d.test_y]), minlength=10).float()
    assert torch.allclose(counts, torch.full((10,), 0.25), atol=0.01)


def test_digits_seed_is_deterministic_and_changes_the_split():
    a, b, c = load_digits(seed=3), load_digits(seed=3), load_digits(seed=4)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)
    assert len(load_digits(test_fraction=0.5).test_x) > len(a.test_x)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_idx_round_trip_with_test_files(mnist_like, gz):
    tmp, x, y, xt, yt = mnist_like
    sfx = ".gz" if gz else ""
    write_idx(tmp / f"train-images-idx3-ubyte{sfx}", x, gz=gz)
    write_idx(tmp / f"train-labels-idx1-ubyte{sfx}", y, gz=gz)  # found from the images' name
    write_idx(tmp / f"t10k-images-idx3-ubyte{sfx}", xt, gz=gz)
    write_idx(tmp / f"t10k-labels-idx1-ubyte{sfx}", yt, gz=gz)
    d = load_idx(tmp / f"train-images-idx3-ubyte{sfx}", test_images=tmp / f"t10k-images-idx3-ubyte{sfx}")
    assert torch.allclose(d.train_x, torch.from_numpy(x).float() / 255)
    assert torch.equal(d.train_y, torch.from_numpy(y)) and torch.equal(d.test_y, torch.from_numpy(yt))
    assert torch.allclose(d.test_x, torch.from_numpy(xt).float() / 255)
    assert d.n_classes == 4 and d.name == "train-images-idx3-ubyte"


def test_idx_split_and_limit(mnist_like):
    tmp, x, y, _, _ = mnist_like
    write_idx(tmp / "imgs.idx", x)
    write_idx(tmp / "labs.idx", y)
    d = load_idx(tmp / "imgs.idx", tmp / "labs.idx", seed=2, test_fraction=0.2)
    assert len(d.test_y) == 8 and torch.equal(torch.bincount(d.test_y), torch.full((4,), 2))
    # every image lands in exactly one split, with its own label
    allx = torch.cat([d.train_x, d.test_x]).reshape(40, -1)
    ally = torch.cat([d.train_y, d.test_y])
    ref = torch.from_numpy(x).float().reshape(40, -1) / 255
    order = [int(torch.nonzero((ref == r).all(1))[0]) for r in allx]
    assert sorted(order) == list(range(40)) and torch.equal(ally, torch.from_numpy(y)[order])
    lim = load_idx(tmp / "imgs.idx", tmp / "labs.idx", limit=20)
    assert len(lim.train_y) + len(lim.test_y) == 20 and lim.n_classes == 2


def test_idx_float_and_int_types_scale_into_unit_range(tmp_path):
    write_idx(tmp_path / "f.idx", np.linspace(-2, 6, 2 * 3 * 4).reshape(2, 3, 4), code=0x0D)
    write_idx(tmp_path / "l.idx", [0, 1], code=0x0C)
    write_idx(tmp_path / "t.idx", np.full((2, 3, 4), 0.5), code=0x0E)
    d = load_idx(tmp_path / "f.idx", tmp_path / "l.idx", test_images=tmp_path / "t.idx",
                 test_labels=tmp_path / "l.idx")
    assert float(d.train_x.min()) == 0.0 and float(d.train_x.max()) == 1.0
    assert torch.equal(d.test_x, torch.full((2, 3, 4), 0.5))
    assert read_idx(tmp_path / "l.idx").dtype == np.int32


def test_idx_bad_magic(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x50\x4b\x03\x04" + bytes(16))
    with pytest.raises(ValueError, match=r"bad is not an IDX file.*got 50 4b 03 04"):
        read_idx(tmp_path / "bad")
    (tmp_path / "code").write_bytes(bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 0]))
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "code")
    with gzip.open(tmp_path / "bad.gz", "wb") as fh:
        fh.write(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad.gz")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(ValueError, match="an empty file"):
        read_idx(tmp_path / "empty")


def test_idx_size_and_shape_errors(tmp_path, mnist_like):
    _, x, y, _, _ = mnist_like
    p = write_idx(tmp_path / "imgs", x)
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"shape \(40, 6, 5\).*the file holds fewer"):
        read_idx(p)
    p2 = write_idx(tmp_path / "imgs2", x)
    p2.write_bytes(p2.read_bytes() + b"\x00")
    with pytest.raises(ValueError, match="the file holds more"):
        read_idx(p2)
    write_idx(tmp_path / "flat", x.reshape(40, 30))
    write_idx(tmp_path / "labs", y)
    with pytest.raises(ValueError, match=r"must hold images \(N, h, w\), got shape \(40, 30\)"):
        load_idx(tmp_path / "flat", tmp_path / "labs")
    write_idx(tmp_path / "short", y[:39])
    write_idx(tmp_path / "imgs3", x)
    with pytest.raises(ValueError, match="holds 40 images but its labels 39"):
        load_idx(tmp_path / "imgs3", tmp_path / "short")
    with pytest.raises(ValueError, match="labels_path is needed"):
        load_idx(tmp_path / "imgs3")
    with pytest.raises(ValueError, match="path must be an existing file"):
        load_idx(tmp_path / "nope-images-idx3")


@pytest.mark.parametrize("kw, match", [(dict(test_fraction=1.0), "test_fraction must be a number in"),
                                       (dict(seed=-1), "seed must be an int >= 0"),
                                       (dict(limit=0), "limit must be a positive int")])
def test_idx_bad_arguments(mnist_like, kw, match):
    tmp, x, y, _, _ = mnist_like
    write_idx(tmp / "i", x)
    write_idx(tmp / "l", y)
    with pytest.raises(ValueError, match=match):
        load_idx(tmp / "i", tmp / "l", **kw)


def test_stratified_split_keeps_singletons_in_train():
    tr, te = stratified_split(np.array([0, 0, 0, 0, 1, 2, 2]), 0.25, 0)
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(7))
    assert 4 in tr and len(te) == 2


def test_to_face_matches_interpolate_and_keeps_constants():
    x = torch.rand(3, 8, 8)
    out = to_face(x, 16, 12)
    ref = torch.nn.functional.interpolate(x[:, None], size=(16, 12), mode="bilinear", align_corners=False)[:, 0]
    assert out.shape == (3, 16, 12) and out.dtype == torch.float32 and torch.equal(out, ref)
    assert torch.allclose(to_face(torch.full((1, 5, 7), 0.3), 9, 4), torch.full((1, 9, 4), 0.3))
    same = to_face(np.ones((2, 4, 4), dtype=np.uint8), 4, 4)
    assert torch.equal(same, torch.ones(2, 4, 4))
    # upsampling by 2 with align_corners=False: the first output pixel is the first input pixel
    ramp = torch.arange(4.0).view(1, 1, 4).expand(1, 4, 4)
    assert torch.allclose(to_face(ramp, 4, 8)[0, 0], torch.tensor([0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0]))


@pytest.mark.parametrize("args, match", [((torch.rand(8, 8), 4, 4), r"images must have shape \(N, h, w\)"),
                                         ((torch.rand(1, 8, 8), 0, 4), "H must be a positive int, got 0"),
                                         ((torch.rand(1, 8, 8), 4, 2.5), "W must be a positive int")])
def test_to_face_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        to_face(*args)
