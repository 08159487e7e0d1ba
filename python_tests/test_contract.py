"""The backends' contract holds on both sides: csrc/contract.h (the C++ and CUDA
kernels) against cellkern/contract.py (every Python backend).

The C++ side cannot import Python, so this test parses the header: the codes of
``enum Act``, the indices of ``enum ParamFlag`` / ``enum ParamScalar`` and the
counts ``kActCount``, ``kParamFlags``, ``kParamScalars`` must equal
ACTIVATION_CODES, PARAM_FLAGS and PARAM_SCALARS (names, values and order). A
second group checks that the kernels read the header's names instead of bare
numbers (csrc/plasticity.h unpack_params, the CUDA activation switch).
"""
import re
from pathlib import Path

import pytest

from cellkern import contract

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "csrc" / "contract.h"


def _strip_comments(text: str) -> str:
    return re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)


def parse_enum(text: str, name: str) -> dict:
    """``{enumerator: value}`` of ``enum <name> [: type] { a = 0, b = 1, ... }`` (explicit values only)."""
    m = re.search(r"\benum\s+" + name + r"\b[^{]*\{([^}]*)\}", _strip_comments(text))
    if m is None:
        raise AssertionError(f"csrc/contract.h: no enum {name}")
    out = {}
    for item in filter(None, (s.strip() for s in m.group(1).split(","))):
        em = re.fullmatch(r"(\w+)\s*=\s*(-?\d+)", item)
        if em is None:
            raise AssertionError(f"csrc/contract.h: enum {name}: {item!r} needs an explicit value")
        out[em.group(1)] = int(em.group(2))
    return out


def parse_constants(text: str) -> dict:
    """``{name: value}`` of every ``constexpr <type> a = 1, b = 2;`` with integer literals."""
    out = {}
    for decl in re.findall(r"\bconstexpr\s+[\w:]+\s+([^;]+);", _strip_comments(text)):
        for item in decl.split(","):
            m = re.fullmatch(r"\s*(\w+)\s*=\s*(-?\d+)\s*", item)
            if m:
                out[m.group(1)] = int(m.group(2))
    return out


def snake(camel: str) -> str:
    """``APlus`` → ``a_plus``, ``BcmLr`` → ``bcm_lr``, ``WMin`` → ``w_min``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", camel).lower()


def header_contract(text: str) -> dict:
    """The header's facts in contract.py's shapes."""
    acts = parse_enum(text, "Act")
    flags = parse_enum(text, "ParamFlag")
    scalars = parse_enum(text, "ParamScalar")
    consts = parse_constants(text)

    def ordered(enum, prefix, what):
        names = {}
        for k, v in enum.items():
            assert k.startswith(prefix), f"csrc/contract.h: {what} {k} lacks the prefix {prefix}"
            assert v not in names, f"csrc/contract.h: {what} index {v} used twice"
            names[v] = snake(k[len(prefix):])
        assert sorted(names) == list(range(len(names))), f"csrc/contract.h: {what} indices {sorted(names)} have a gap"
        return tuple(names[i] for i in range(len(names)))

    return {
        "activations": {snake(k[1:]): v for k, v in acts.items()},
        "flags": ordered(flags, "kFlag", "flag"),
        "scalars": ordered(scalars, "kScalar", "scalar"),
        "kActCount": consts.get("kActCount"),
        "kParamFlags": consts.get("kParamFlags"),
        "kParamScalars": consts.get("kParamScalars"),
    }


def check(text: str) -> None:
    """Raises AssertionError where the header text and cellkern.contract disagree."""
    h = header_contract(text)
    assert h["activations"] == contract.ACTIVATION_CODES, (
        f"activation codes: csrc/contract.h {h['activations']} vs contract.py {contract.ACTIVATION_CODES}")
    assert h["kActCount"] == len(contract.ACTIVATION_CODES), (
        f"kActCount {h['kActCount']} vs {len(contract.ACTIVATION_CODES)} activations")
    assert h["flags"] == contract.PARAM_FLAGS, f"flags: csrc/contract.h {h['flags']} vs {contract.PARAM_FLAGS}"
    assert h["scalars"] == contract.PARAM_SCALARS, (
        f"scalars: csrc/contract.h {h['scalars']} vs {contract.PARAM_SCALARS}")
    assert h["kParamFlags"] == len(contract.PARAM_FLAGS), f"kParamFlags {h['kParamFlags']}"
    assert h["kParamScalars"] == len(contract.PARAM_SCALARS), f"kParamScalars {h['kParamScalars']}"


def test_header_agrees_with_contract_py():
    check(HEADER.read_text())


@pytest.mark.parametrize("edit", [
    ("kTanh = 1", "kTanh = 5"),                                 # a code changed
    ("kRelu = 2, kSigmoid = 3", "kRelu = 3, kSigmoid = 2"),     # two codes swapped
    ("kFlagBcm = 2", "kFlagBcm = 9"),                           # an index off the end (a gap)
    ("kScalarWMin = 11,\n  kScalarWMax = 12", "kScalarWMax = 11,\n  kScalarWMin = 12"),  # order swapped
    ("kScalarBeta = 9", "kScalarBetta = 9"),                    # a renamed field
    ("kParamScalars = 13", "kParamScalars = 12"),               # a count
])
def test_check_fails_on_a_changed_header(edit):
    text = HEADER.read_text()
    old, new = edit
    assert old in text, f"the planted edit {old!r} no longer matches csrc/contract.h: update this test"
    with pytest.raises(AssertionError):
        check(text.replace(old, new))


def test_check_fails_on_a_changed_contract_py(monkeypatch):
    text = HEADER.read_text()
    monkeypatch.setattr(contract, "PARAM_SCALARS", contract.PARAM_SCALARS[:-1])
    with pytest.raises(AssertionError):
        check(text)
    monkeypatch.undo()
    monkeypatch.setattr(contract, "ACTIVATION_CODES", {**contract.ACTIVATION_CODES, "gelu": 4})
    with pytest.raises(AssertionError):
        check(text)


def test_kernels_read_the_contract_names():
    """unpack_params indexes by the header's names (no bare numbers), each once;
    the CUDA activation switch and the CPU dispatch switch use the codes' names."""
    body = re.search(r"unpack_params\([^)]*\)\s*\{(.*?)\n\}", (ROOT / "csrc" / "plasticity.h").read_text(), re.S)
    assert body is not None, "csrc/plasticity.h: unpack_params not found"
    text = body.group(1)
    assert not re.search(r"\b[fv]\[\d+\]", text), "unpack_params indexes by a bare number"
    h = header_contract(HEADER.read_text())
    for prefix, names, arr in (("kFlag", h["flags"], "f"), ("kScalar", h["scalars"], "v")):
        for n in names:
            idx = prefix + "".join(p.capitalize() for p in n.split("_"))
            assert len(re.findall(rf"\b{arr}\[{idx}\]", text)) == 1, f"unpack_params reads {arr}[{idx}] not once"
            assert re.search(rf"P\.{n}\s*=\s*{arr}\[{idx}\]", text), f"unpack_params: P.{n} is not {arr}[{idx}]"
    for path in (ROOT / "csrc" / "cuda" / "common.cuh", ROOT / "csrc" / "cpu" / "activations.h"):
        src = _strip_comments(path.read_text())
        assert not re.search(r"\bcase\s+\d+\s*:", src), f"{path.name}: an activation switch on a bare number"
