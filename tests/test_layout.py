"""The package's layout holds: every import follows the table of allowed imports between its layers (so
imports point downward: no cycle, no stage importing a stage, no library importing a stage or the
orchestration above it), and every dvc.yaml stage lists exactly the modules its code imports, so
`dvc repro` reruns a stage whenever code it runs has changed.

The import graph is read from the source with `ast`, counting every import statement (at module
level, inside functions, under TYPE_CHECKING), and the packages a module sits in (Python runs their
`__init__` first).
"""

from __future__ import annotations

import ast
import graphlib
import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PACKAGE = "desensitize"
STAGES = f"{PACKAGE}.stages"

# The layers, bottom up: a module's layer is its subpackage's name; the top-level modules are the kernel
# every layer uses, the formats that registered models and release bundles persist (their import paths
# are recorded in pickles), the inference API and the entry points.
TOP_LEVEL = {
    **dict.fromkeys(("errors", "paths", "storage", "config", "stats"), "kernel"),
    **dict.fromkeys(("release", "models", "masknet"), "formats"),
    "inference": "inference",
    **dict.fromkeys(("cli", "__main__"), "entry"),
}
_LIBRARIES = {"kernel", "formats", "runtime", "data", "learning", "masking", "bundle", "attack", "search"}
# Which layers each layer may import (besides itself). The README shows this table.
ALLOWED = {
    "kernel": set(),
    "formats": {"kernel"},
    "runtime": {"kernel"},
    "data": {"kernel"},
    "learning": {"kernel", "formats", "runtime"},
    "masking": {"kernel", "runtime", "learning"},
    "bundle": {"kernel", "formats", "data", "masking"},
    "attack": {"kernel", "runtime", "learning", "masking"},
    "search": {"kernel", "formats", "runtime", "data", "learning", "masking", "bundle", "attack", "reporting"},
    "inference": {"kernel", "formats", "runtime", "learning", "masking"},
    "reporting": {"kernel", "formats"},
    "tracking": {"kernel", "data"},
    "stages": _LIBRARIES | {"inference", "reporting", "tracking"},
    "orchestration": _LIBRARIES | {"inference", "reporting", "tracking", "stages"},
    "entry": _LIBRARIES | {"inference", "reporting", "tracking", "stages", "orchestration"},
}


def layer(module: str) -> str:
    """The layer of a module of the package (the package itself belongs to the kernel)."""
    parts = module.split(".")
    if len(parts) == 1:
        return "kernel"
    return TOP_LEVEL[parts[1]] if len(parts) == 2 and parts[1] in TOP_LEVEL else parts[1]


def forbidden_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import the table does not allow, as `module -> imported (layer -> layer)`."""
    return [
        f"{module} -> {imported} ({layer(module)} -> {layer(imported)})"
        for module, deps in sorted(graph.items())
        for imported in sorted(deps)
        if layer(imported) != layer(module) and layer(imported) not in ALLOWED[layer(module)]
    ]


def module_files(src: Path = SRC) -> dict[str, Path]:
    """Module name -> file, for every module of the package."""
    modules = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules that `path` imports anywhere, plus the packages it sits in."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from a import b` imports a, and a.b too when b is a module.
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(name for name in names if name in modules)
    name = next(n for n, p in modules.items() if p == path)
    parts = name.split(".")
    found.update(".".join(parts[:k]) for k in range(1, len(parts)))
    return found - {name}


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    modules = module_files(src)
    return {name: imports_of(path, modules) for name, path in modules.items()}


def closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph[name])
    return seen


def code_deps_problems(dvc: dict, graph: dict[str, set[str]], modules: dict[str, Path], root: Path) -> list[str]:
    """For every stage of a dvc.yaml: source files it imports but does not list, and listed source
    files it never imports. Empty when every stage's code deps are exact."""
    problems = []
    for stage, spec in dvc["stages"].items():
        needed = {modules[name].relative_to(root).as_posix() for name in closure(graph, f"{STAGES}.{stage}")}
        listed = {dep for dep in spec.get("deps", []) if dep.startswith("src/")}
        problems += [f"{stage}: imports {path} but does not list it in deps" for path in sorted(needed - listed)]
        problems += [f"{stage}: lists {path} but never imports it" for path in sorted(listed - needed)]
    return problems


GRAPH = import_graph()


def test_the_package_has_no_import_cycle():
    graphlib.TopologicalSorter(GRAPH).prepare()  # raises CycleError naming the cycle


def test_the_cycle_check_sees_imports_inside_functions(tmp_path: Path):
    package = tmp_path / PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from desensitize import b\n")
    (package / "b.py").write_text("def f():\n    from desensitize.a import g\n")
    with pytest.raises(graphlib.CycleError):
        graphlib.TopologicalSorter(import_graph(tmp_path)).prepare()


def test_a_stage_never_imports_another_stage():
    stages = {name for name in GRAPH if name.startswith(f"{STAGES}.")}
    assert stages, "no stage modules found"
    offenders = {stage: sorted(GRAPH[stage] & stages) for stage in stages if GRAPH[stage] & stages}
    assert not offenders


def test_every_module_is_in_a_layer_of_the_table():
    assert {layer(module) for module in GRAPH} <= set(ALLOWED)
    assert all(allowed <= set(ALLOWED) for allowed in ALLOWED.values())


def test_every_import_follows_the_table_of_allowed_imports():
    assert forbidden_imports(GRAPH) == []


def test_the_table_check_names_a_forbidden_import(tmp_path: Path):
    """A copy of the package where the gate's rules import the MLflow layer: the check names it."""
    shutil.copytree(SRC / PACKAGE, tmp_path / PACKAGE)
    gate = tmp_path / PACKAGE / "attack" / "gate.py"
    gate.write_text(gate.read_text() + "\nfrom desensitize.tracking.runs import item_tag  # noqa: E402\n")
    assert forbidden_imports(import_graph(tmp_path)) == [
        f"{PACKAGE}.attack.gate -> {PACKAGE}.tracking.runs (attack -> tracking)"
    ]


def test_every_dvc_stage_has_a_stage_module_named_as_the_stage():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert set(dvc["stages"]) == {name.removeprefix(f"{STAGES}.") for name in GRAPH if name.startswith(f"{STAGES}.")}


def test_dvc_code_deps_are_exactly_what_each_stage_imports():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert code_deps_problems(dvc, GRAPH, module_files(), REPO) == []


def test_a_missing_code_dep_is_caught():
    """Drop one module `evaluate` imports from its deps: the check names it."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    dropped = f"src/{PACKAGE}/learning/training.py"
    assert dropped in dvc["stages"]["evaluate"]["deps"]
    dvc["stages"]["evaluate"]["deps"].remove(dropped)
    assert code_deps_problems(dvc, GRAPH, module_files(), REPO) == [
        f"evaluate: imports {dropped} but does not list it in deps"
    ]


def test_dvc_yaml_interpolates_exactly_the_templated_params_keys():
    """The source is the ingest stage's one data dep, ${data.path}; every key dvc.yaml interpolates is
    one that check-params requires in the file (desensitize.orchestration.pipeline.TEMPLATED)."""
    import re

    from desensitize.orchestration.pipeline import TEMPLATED

    text = (REPO / "dvc.yaml").read_text()
    assert sorted(set(re.findall(r"\$\{\s*([\w.]+)\s*\}", text))) == sorted(TEMPLATED)
    ingest = yaml.safe_load(text)["stages"]["ingest"]["deps"]
    assert [dep for dep in ingest if not dep.startswith("src/")] == ["${data.path}"]
