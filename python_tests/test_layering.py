"""The package's two floors (STYLE rule 17): the library never imports the
training application, nothing outside the backends uses a backend module as a
helper, private names stay in their module, module-level imports form no cycle,
and ``import cellkern`` loads no application module or application dependency."""
import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "cellkern"
#: the compiled extensions (``cellkern._C``, ``cellkern._C_cuda``): modules, private by name only
COMPILED = ("_C", "_C_cuda")
APP_DEPS = ("tqdm", "matplotlib", "sklearn", "click", "yaml")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".")
    if not is_pkg:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


MODULES = {_module_name(p) for p in ROOT.rglob("*.py")}


def imports(source: str, mod: str, is_pkg: bool, *, top_level_only: bool):
    """``(target module, imported names, line)`` of each import statement."""
    tree = ast.parse(source)
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, (), node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(mod, is_pkg, node)
            names = tuple(a.name for a in node.names)
            yield target, names, node.lineno
            for n in names:  # ``from . import ops`` imports the submodule ``cellkern.ops``
                if f"{target}.{n}" in MODULES:
                    yield f"{target}.{n}", (), node.lineno


def _sources():
    for path in sorted(ROOT.rglob("*.py")):
        yield _module_name(path), path.name == "__init__.py", path.read_text()


def layering_violations(sources) -> list:
    bad = []
    for mod, is_pkg, src in sources:
        in_app = mod == "cellkern.train" or mod.startswith("cellkern.train.")
        in_backends = mod.startswith("cellkern.backends")
        for target, names, line in imports(src, mod, is_pkg, top_level_only=False):
            where = f"{mod}:{line} imports {target}"
            if not in_app and (target == "cellkern.train" or target.startswith("cellkern.train.")):
                bad.append(f"{where}: the library must not import the training application")
            if not in_app and target.split(".")[0] in APP_DEPS:
                bad.append(f"{where}: an application dependency in the library")
            if (target.startswith("cellkern.backends.") and not in_backends and target != "cellkern.backends"):
                bad.append(f"{where}: only the backends use a backend module; the rest uses cellkern.backends, "
                           "cellkern.contract or cellkern.stencil")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")
                       and f"{target}.{n}" not in MODULES and n not in COMPILED]
            if target.startswith("cellkern") and private and target != mod.rsplit(".", 1)[0]:
                bad.append(f"{where}: private names {private} cross modules")
    return bad


def import_cycles(sources) -> list:
    graph = {}
    for mod, is_pkg, src in sources:
        deps = set()
        for target, _, _ in imports(src, mod, is_pkg, top_level_only=True):
            if target in MODULES and target != mod and not mod.startswith(target + "."):
                deps.add(target)
        graph[mod] = deps
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d] if d in stack else [m, d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return cycles


def test_the_library_never_imports_the_application_nor_backend_helpers():
    assert layering_violations(_sources()) == []


def test_no_import_cycles():
    assert import_cycles(_sources()) == []


@pytest.mark.parametrize("planted, expect", [
    ("from .train.trainer import Trainer\n", "must not import the training application"),
    ("from .backends.reference import shift\n", "only the backends use a backend module"),
    ("import tqdm\n", "an application dependency"),
    ("from .ops.plasticity import _begin\n", "private names"),
])
def test_the_checks_catch_a_planted_violation(planted, expect):
    sources = [(m, p, s + planted if m == "cellkern.memory" else s) for m, p, s in _sources()]
    assert any(expect in v for v in layering_violations(sources))


def test_the_cycle_check_catches_a_planted_cycle():
    sources = [(m, p, s + "from . import memory\n" if m == "cellkern.stencil" else s) for m, p, s in _sources()]
    assert import_cycles(sources)


def test_import_cellkern_loads_no_application_module():
    # modules that ``import torch`` loads itself (torch.hub imports tqdm where it is installed) do not count
    code = ("import sys, torch; before = set(sys.modules); import cellkern; bad = sorted(m for m in "
            "set(sys.modules) - before if m.startswith(('tqdm', 'matplotlib', 'sklearn', 'click', 'yaml', "
            "'cellkern.train'))); print(bad); assert not bad")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    lazy = subprocess.run([sys.executable, "-c", "import cellkern as ck; print(ck.Trainer.__module__)"],
                          capture_output=True, text=True, timeout=120)
    assert lazy.stdout.strip() == "cellkern.train.trainer", lazy.stderr


COLD_COMPILE = r"""
import torch, cellkern as ck

class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(0.05 * torch.rand(26, 4, 5, 6))

    def forward(self, s):
        return ck.ops.propagate(s, self.w, leak=0.5, boundary=("zero", "periodic", "periodic")).sum(1)

m, s = Model(), torch.randn(2, 3, 4, 5, 6)
explained = torch._dynamo.explain(m)(s)        # the very first cellkern call, traced
assert explained.graph_break_count == 0, explained.break_reasons
torch._dynamo.reset()
out = torch.compile(m, fullgraph=True)(s)
assert torch.allclose(out, m(s), atol=1e-6)
print("ok", explained.graph_count, explained.graph_break_count)
"""


def test_compile_fullgraph_as_the_first_cellkern_call():
    """Backends load when ``cellkern`` is imported, never inside a traced op."""
    res = subprocess.run([sys.executable, "-c", COLD_COMPILE], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.startswith("ok"), res.stdout + res.stderr[-3000:]
