"""The package's structure: imports go down the layers, never in a cycle, and no module uses
another module's private (underscore) names. Read from the source with ``ast``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "dat"

# Bottom to top. A module may import its own layer and the layers below it.
LAYERS: list[tuple[str, ...]] = [
    ("dat.errors", "dat.fileio", "dat.version", "dat.episode", "dat.provenance", "dat.progress",
     "dat.cpu_kernels", "dat.precision",
     "dat.stats", "dat.prompting"),
    ("dat.models", "dat.api"),
    ("dat.kvcache", "dat.decoding", "dat.continuous", "dat.steer", "dat.backends"),
    ("dat.planner",),
    ("dat.agent",),
    ("dat.judges",),
    ("dat.envs", "dat.partners"),
    ("dat.rollout", "dat.buffer_format", "dat.buffer_writer", "dat.buffer"),
    ("dat.training", "dat.transitions", "dat.td3bc", "dat.clone_data", "dat.fidelity", "dat.clone",
     "dat.quality", "dat.report", "dat.report_page", "dat.gain", "dat.episode_log", "dat.agentspec",
     "dat.splitcheck", "dat.evaluate", "dat.directions", "dat.probe", "dat.baseline_folder"),
    ("dat.collect", "dat.chat", "dat.serve_schema", "dat.serve_engine", "dat.serve_batcher", "dat.serve",
     "dat.distributed", "dat.quickstart", "dat.baselines"),
    ("dat.cli", "dat"),
]


def module_name(path: Path) -> str:
    parts = ("dat",) + path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def layer_of(name: str) -> int:
    """The layer of a module: its own entry, else that of the closest package listed (so
    ``dat.envs.taboo`` is in ``dat.envs``'s layer). Only the package ``dat`` itself is in
    the top layer; its submodules need entries of their own."""
    probe = name
    while probe:
        for i, layer in enumerate(LAYERS):
            if probe in layer:
                return i
        if "." not in probe or probe.count(".") == 1 and probe.rpartition(".")[0] == "dat":
            break
        probe = probe.rpartition(".")[0]
    raise AssertionError(f"{name} is in no layer: add it to LAYERS in {Path(__file__).name}")


def imports(name: str) -> list[tuple[str, int, str]]:
    """``(imported module, line, imported name or '')`` for every import of a dat module,
    lazy ones inside functions included."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, "") for a in node.names if a.name.split(".")[0] == "dat"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            if base.split(".")[0] != "dat":
                continue
            for a in node.names:
                full = f"{base}.{a.name}"
                out.append((full if full in MODULES else base, node.lineno, a.name))
    return out


def test_every_module_has_a_layer():
    for name in MODULES:
        layer_of(name)


def test_imports_go_down_the_layers():
    wrong = []
    for name in MODULES:
        for target, line, _ in imports(name):
            if target in MODULES and layer_of(target) > layer_of(name):
                wrong.append(f"{name}:{line} imports {target} (a higher layer)")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = {n: {t for t, _, _ in imports(n) if t in MODULES and t != n} for n in MODULES}
    state: dict[str, int] = {}
    cycles = []

    def visit(n, path):
        state[n] = 1
        for t in sorted(graph[n]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert not cycles, "\n".join(cycles)


# torch names that start with "_" but have no public spelling: a tensor's in-place counter,
# and oneDNN operators registered under underscored names (the kernels torch.compile uses)
TORCH_UNDERSCORED = {"_version", "_reorder_linear_weight", "_linear_pointwise"}


def test_no_module_uses_another_modules_private_names():
    found = []
    for name, path in MODULES.items():
        for target, line, imported in imports(name):
            if imported.startswith("_") and not imported.startswith("__"):
                found.append(f"{name}:{line} imports {target}.{imported}")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        own = {n.name for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
        for node in ast.walk(tree):
            # obj._x is only for an object's own class: self._x, cls._x, OwnClass._x
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and node.attr not in TORCH_UNDERSCORED
                    and not (isinstance(node.value, ast.Name)
                             and node.value.id in {"self", "cls"} | own)):
                found.append(f"{name}:{node.lineno} uses {ast.unparse(node)}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("name", ["dat.version", "dat.episode", "dat.provenance", "dat.buffer"])
def test_storage_and_vocabulary_do_not_import_the_model(name):
    """Reading a buffer or a provenance record must not need torch models or transformers."""
    seen, todo = set(), [name]
    while todo:
        n = todo.pop()
        if n in seen or n not in MODULES:
            continue
        seen.add(n)
        todo += [t for t, _, _ in imports(n)]
    assert not seen & {"dat.steer", "dat.models", "dat.planner", "dat"}, sorted(seen)
