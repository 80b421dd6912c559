"""The package's layout holds: imports point downward (no cycle, no stage importing a stage, no library
importing a stage or the orchestration above it), and every dvc.yaml stage lists exactly the
modules its code imports, so `dvc repro` reruns a stage whenever code it runs has changed.

The import graph is read from the source with `ast`, counting every import statement (at module
level, inside functions, under TYPE_CHECKING), and the packages a module sits in (Python runs their
`__init__` first).
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PACKAGE = "desensitize"
STAGES = f"{PACKAGE}.stages"
# Above the stages: entry points, the stage table and runner, MLflow tracking and what reads it.
ORCHESTRATION = {
    f"{PACKAGE}.{name}"
    for name in ("__main__", "cli", "runner", "pipeline", "tracking", "lineage", "runreport", "sweep")
}


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


def test_libraries_import_neither_stages_nor_the_orchestration_above_them():
    above = ORCHESTRATION | {name for name in GRAPH if name.startswith(STAGES)}
    libraries = set(GRAPH) - above - {PACKAGE}
    offenders = {lib: sorted(GRAPH[lib] & above) for lib in libraries if GRAPH[lib] & above}
    assert not offenders


def test_every_dvc_stage_has_a_stage_module_named_as_the_stage():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert set(dvc["stages"]) == {name.removeprefix(f"{STAGES}.") for name in GRAPH if name.startswith(f"{STAGES}.")}


def test_dvc_code_deps_are_exactly_what_each_stage_imports():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert code_deps_problems(dvc, GRAPH, module_files(), REPO) == []


def test_a_missing_code_dep_is_caught():
    """Drop one module `evaluate` imports from its deps: the check names it."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    dropped = f"src/{PACKAGE}/training.py"
    assert dropped in dvc["stages"]["evaluate"]["deps"]
    dvc["stages"]["evaluate"]["deps"].remove(dropped)
    assert code_deps_problems(dvc, GRAPH, module_files(), REPO) == [
        f"evaluate: imports {dropped} but does not list it in deps"
    ]


def test_dvc_yaml_interpolates_exactly_the_templated_params_keys():
    """The source is the ingest stage's one data dep, ${data.path}; every key dvc.yaml interpolates is
    one that check-params requires in the file (desensitize.pipeline.TEMPLATED)."""
    import re

    from desensitize.pipeline import TEMPLATED

    text = (REPO / "dvc.yaml").read_text()
    assert sorted(set(re.findall(r"\$\{\s*([\w.]+)\s*\}", text))) == sorted(TEMPLATED)
    ingest = yaml.safe_load(text)["stages"]["ingest"]["deps"]
    assert [dep for dep in ingest if not dep.startswith("src/")] == ["${data.path}"]
