"""Bad input at the edges, fuzzed: config files and IDX files.

Every broken config file — a wrong type, a negative or huge dim, a NaN or
infinite rate, an unknown key, no stages, malformed TOML or YAML — is a
``ValueError`` that names the key (or the file), never another exception or
a silent default. Every broken IDX file — a wrong magic number, a short or
long file, a header whose sizes do not match, labels that do not match the
images — is a ``ValueError`` naming the file; a well-formed one reads back.
"""
import gzip
import math
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cellkern.train.config import load_config
from cellkern.train.data import load_idx, read_idx

yaml = pytest.importorskip("yaml")

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# -- config files --------------------------------------------------------------------------------
#: key → (kind, constraint) of the keys a file may set; constraint: "pos" (> 0),
#: "nonneg" (>= 0), "unit" (0, 1], None
GLOBAL = {"channels": ("int", "pos"), "seed": ("int", "nonneg"), "monitor_every": ("int", "pos"),
          "batch": ("int", "pos"), "present_steps": ("int", "pos"), "cluster_every": ("int", "pos"),
          "clusters": ("int", "pos"), "decoder_buffer": ("int", "pos"), "eval_samples": ("int", "pos"),
          "checkpoint_every": ("int", "pos"), "input_gain": ("float", "nonneg"), "leak": ("float", "nonneg"),
          "kappa": ("float", "nonneg"), "amplification": ("float", "nonneg"), "decoder_alpha": ("float", "pos"),
          "stencil": ("str", None), "data": ("str", None), "data_labels": ("str", None)}
RULE = {"stdp_lr": ("float", "nonneg"), "a_plus": ("float", None), "a_minus": ("float", None),
        "tau_plus": ("float", "pos"), "tau_minus": ("float", "pos"), "bcm_lr": ("float", "nonneg"),
        "w_min": ("float", None), "w_max": ("float", None), "w_init": ("float", "nonneg"),
        "theta0": ("float", "pos")}
STAGE = {"name": ("str", None), "steps": ("int", "pos"), "plasticity_profile": ("str", None),
         "activity_threshold": ("float", "nonneg"), "sparse_keep": ("float", "unit"),
         "clustering_enabled": ("bool", None), "memory_optimizations": ("bool", None),
         "emergence_tracking": ("bool", None), "progressive_scaling": ("bool", None),
         "decoder_monitoring": ("bool", None), "transfer_learning": ("bool", None), "dims": ("dims", None)}

BASE = {"seed": 1, "batch": 4, "rule": {"stdp_lr": 0.05}, "stages": [{"name": "a", "dims": [4, 5, 6], "steps": 10},
                                                                     {"name": "b", "dims": [5, 6, 7], "steps": 8}]}

_text = st.text(alphabet="abcxyz_ -", min_size=0, max_size=8)


def bad_values(kind, constraint):
    """Values a key of this kind and constraint must refuse."""
    wrong_type = {
        "int": st.one_of(_text, st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: f != int(f)),
                         st.booleans(), st.lists(st.integers(), max_size=2)),
        "float": st.one_of(_text, st.booleans(), st.lists(st.floats(), max_size=2)),
        "str": st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.lists(_text, max_size=2)),
        "bool": st.one_of(st.integers(), _text, st.floats(allow_nan=False)),
        "dims": st.one_of(_text, st.integers(), st.lists(st.integers(1, 9), max_size=5).filter(lambda v: len(v) != 3),
                          st.lists(st.integers(-(2**40), 0), min_size=3, max_size=3),
                          st.lists(st.integers(2**31, 2**62), min_size=3, max_size=3),
                          st.lists(st.integers(2**14, 2**30), min_size=3, max_size=3),   # > 2**40 cells
                          st.lists(st.one_of(_text, st.booleans(), st.just(2.5)), min_size=3, max_size=3)),
    }[kind]
    out = [wrong_type]
    if kind == "float":
        out.append(st.sampled_from([math.nan, math.inf, -math.inf]))
    if constraint == "pos":
        out.append(st.integers(-(2**40), 0) if kind == "int" else st.floats(-1e30, 0.0))
    elif constraint == "nonneg":
        out.append(st.integers(-(2**40), -1) if kind == "int" else st.floats(-1e30, -1e-12))
    elif constraint == "unit":
        out.append(st.one_of(st.floats(-1e30, 0.0), st.floats(1.0 + 1e-9, 1e30)))
    return st.one_of(*out)


@st.composite
def broken_config(draw):
    """``(data, key name the error must mention)``."""
    data = {"seed": BASE["seed"], "batch": BASE["batch"], "rule": dict(BASE["rule"]),
            "stages": [dict(s) for s in BASE["stages"]]}
    where = draw(st.sampled_from(["global", "rule", "stage", "unknown", "stages"]))
    if where == "global":
        key = draw(st.sampled_from(sorted(GLOBAL)))
        data[key] = draw(bad_values(*GLOBAL[key]))
        return data, key
    if where == "rule":
        key = draw(st.sampled_from(sorted(RULE)))
        data["rule"][key] = draw(bad_values(*RULE[key]))
        return data, f"rule.{key}"
    if where == "stage":
        i = draw(st.integers(0, 1))
        key = draw(st.sampled_from(sorted(STAGE)))
        data["stages"][i][key] = draw(bad_values(*STAGE[key]))
        return data, f"stages[{i}].{key}"
    if where == "unknown":
        key = draw(st.text(alphabet="abcdefgh_", min_size=1, max_size=10).filter(
            lambda k: k not in GLOBAL and k not in RULE and k not in STAGE and k not in ("rule", "stages", "budget")))
        table = draw(st.sampled_from(["global", "rule", "stage"]))
        (data if table == "global" else data["rule"] if table == "rule" else data["stages"][0])[key] = 1
        return data, key
    data["stages"] = draw(st.sampled_from([[], {}, "stage", 3, [3], [[]]]))
    return data, "stages"


def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def _to_toml(data) -> str:
    return "\n".join(f"{k} = {_toml_value(v)}" for k, v in data.items()) + "\n"


@SETTINGS
@given(case=broken_config(), fmt=st.sampled_from(["toml", "yaml"]))
def test_broken_config_is_a_value_error_naming_the_key(tmp_path_factory, case, fmt):
    data, key = case
    path = tmp_path_factory.mktemp("cfg") / f"c.{fmt}"
    path.write_text(_to_toml(data) if fmt == "toml" else yaml.safe_dump(data))
    with pytest.raises(ValueError) as ei:
        load_config(path)
    assert key in str(ei.value), (key, str(ei.value))
    assert str(ei.value).startswith("config: ")


@SETTINGS
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))),
       fmt=st.sampled_from(["toml", "yaml"]), raw=st.booleans())
def test_any_file_content_loads_or_is_a_value_error(tmp_path_factory, text, fmt, raw):
    """Random text (or random bytes) as a config file: either a valid config
    or a ValueError that names the file or a key — never another exception."""
    path = tmp_path_factory.mktemp("cfg") / f"c.{fmt}"
    if raw:
        path.write_bytes(text.encode("latin-1", errors="replace"))
    else:
        path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except ValueError as exc:
        assert str(exc).startswith("config: "), str(exc)


@pytest.mark.parametrize("text,fmt,match", [
    ("stages = [", "toml", "is not valid TOML"),
    ("seed = 99999999999999999999", "toml", "seed must be at most"),
    ("seed: [1, 2", "yaml", "is not valid YAML"),
    ("\tseed: 1\n  - x", "yaml", "is not valid YAML"),
    ("- 1\n- 2", "yaml", "the config must be a table"),
    ("0", "yaml", "the config must be a table"),
    ("stages: []", "yaml", "stages must be a non-empty list"),
    ("seed: .nan", "yaml", "seed must be an integer"),
    ("leak: .inf", "yaml", "leak must be finite"),
    ("leak = nan", "toml", "leak must be finite"),
    ("seed: 100000000000000000000000", "yaml", "seed must be at most"),
    ("1: 2\nfoo: 3", "yaml", "unknown key"),
    ("budget = \"lots\"", "toml", "budget"),
    ("decoder_alpha = 0", "toml", "decoder_alpha must be > 0"),
    ("[[stages]]\ndims = [0, 4, 4]", "toml", r"stages\[0\].dims must be positive"),
    ("[[stages]]\ndims = [4096, 4096, 131072]", "toml", r"stages\[0\].dims must hold at most 2\*\*40 cells"),
])
def test_broken_config_examples(tmp_path, text, fmt, match):
    path = tmp_path / f"c.{fmt}"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_config(path)


def test_wrong_type_is_still_a_type_error(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('batch = "4"')
    with pytest.raises(TypeError, match="batch must be an integer"):
        load_config(path)


# -- IDX files -----------------------------------------------------------------------------------
_DT = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _idx_bytes(arr: np.ndarray, code: int) -> bytes:
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape) + arr.astype(_DT[code]).tobytes()


@st.composite
def idx_file(draw):
    """``(bytes, expected array or None when the file is broken)``."""
    code = draw(st.sampled_from(sorted(_DT)))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=1, max_size=3)))
    arr = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape) % 100
    good = _idx_bytes(arr, code)
    damage = draw(st.sampled_from(["none", "magic", "cut", "extra", "dims", "header-cut"]))
    if damage == "none":
        return good, arr
    if damage == "magic":
        i = draw(st.integers(0, 3))          # the ndim byte (3) only to 0: other values may parse by chance
        b = 0 if i == 3 else draw(st.integers(0, 255))
        bad = good[:i] + bytes([b]) + good[i + 1:]
        valid = (i in (0, 1) and b == 0) or (i == 2 and b in _DT and np.dtype(_DT[b]).itemsize ==
                                             np.dtype(_DT[code]).itemsize)
        assume(not valid)
        return bad, None
    if damage == "cut":
        assume(len(good) > 4 + 4 * arr.ndim)
        return good[:draw(st.integers(4 + 4 * arr.ndim, len(good) - 1))], None
    if damage == "extra":
        return good + draw(st.binary(min_size=1, max_size=16)), None
    if damage == "header-cut":
        return good[:draw(st.integers(0, 3 + 4 * arr.ndim))], None
    # sizes in the header that do not match the data (negative or huge ones too)
    k = draw(st.integers(0, arr.ndim - 1))
    new = draw(st.one_of(st.integers(-(2**31), -1), st.integers(2**20, 2**31 - 1), st.integers(0, 7)))
    assume(new != arr.shape[k] and not (new >= 0 and 0 in arr.shape[:k] + arr.shape[k + 1:]))
    head = list(arr.shape)
    head[k] = new
    return good[:4] + struct.pack(f">{arr.ndim}i", *head) + good[4 + 4 * arr.ndim:], None


@SETTINGS
@given(case=idx_file(), gz=st.booleans())
def test_idx_reads_back_or_is_a_value_error(tmp_path_factory, case, gz):
    data, want = case
    path = tmp_path_factory.mktemp("idx") / "f-idx"
    path.write_bytes(gzip.compress(data) if gz else data)
    if want is None:
        with pytest.raises(ValueError, match=f"read_idx: {path.name}"):
            read_idx(path)
    else:
        got = read_idx(path)
        assert got.shape == want.shape and np.array_equal(got.astype(np.int64), want)


@SETTINGS
@given(n_images=st.integers(0, 12), n_labels=st.integers(0, 12), labels_ndim=st.integers(1, 2),
       negative=st.booleans())
def test_idx_pairs_must_match(tmp_path_factory, n_images, n_labels, labels_ndim, negative):
    d = tmp_path_factory.mktemp("pair")
    x = (np.arange(n_images * 16).reshape(n_images, 4, 4) % 255).astype(np.uint8)
    y = (np.arange(n_labels) % 3 - (1 if negative else 0)).astype(np.int32)
    if labels_ndim == 2:
        y = y.reshape(n_labels, 1)
    (d / "train-images-idx3-ubyte").write_bytes(_idx_bytes(x, 0x08))
    (d / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(y, 0x0C))
    ok = n_images == n_labels and labels_ndim == 1 and not (negative and n_labels > 0) and n_images >= 2
    if ok:
        try:
            ds = load_idx(d / "train-images-idx3-ubyte")
        except ValueError as exc:      # too few samples per class to split is a clear error too
            assert "load_idx" in str(exc) or "split" in str(exc), str(exc)
            return
        assert ds.train_x.shape[0] + ds.test_x.shape[0] == n_images
    else:
        with pytest.raises(ValueError, match="load_idx|read_idx|split|stratified"):
            load_idx(d / "train-images-idx3-ubyte")
