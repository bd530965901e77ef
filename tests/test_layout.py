"""The layout's promises: runners/ knows nothing of search/, no import cycles, heavy imports only where trials run."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("search", "runners", "spaces")


def project_imports(path: Path) -> set[str]:
    """Every project module a file imports, at module level or inside functions (a hidden cycle is a cycle)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name.split(".")[0] in PACKAGES}
    return found


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every project module."""
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (a `from pkg import name` counts pkg.name only if it is a module)."""
    known = modules()
    return {name: {m for m in project_imports(path) if m in known and m != name} for name, path in known.items()}


def test_runners_import_nothing_from_search():
    offenders = {name: sorted(m for m in deps if m.startswith("search"))
                 for name, deps in import_graph().items() if name.startswith("runners")}
    assert not {k: v for k, v in offenders.items() if v}


def test_there_is_no_import_cycle():
    graph, cycles = import_graph(), []

    def visit(node, path, seen):
        for nxt in graph[node]:
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in seen:
                seen.add(nxt)
                visit(nxt, path + [nxt], seen)

    for start in graph:
        visit(start, [start], {start})
    assert not cycles, f"import cycles: {sorted({' -> '.join(c) for c in cycles})[:5]}"


def test_the_cycle_check_can_find_a_cycle(tmp_path, monkeypatch):
    monkeypatch.setitem(globals(), "import_graph", lambda: {"a": {"b"}, "b": {"a"}})
    with pytest.raises(AssertionError, match="a -> b -> a"):
        test_there_is_no_import_cycle()


@pytest.mark.parametrize("argv", [["search.run", "--space", "nope"], ["search.results", "--help"],
                                  ["search.predict", "--help"], ["search.run", "--help"]])
def test_answers_that_need_no_training_do_not_import_tensorflow(argv, tmp_path):
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", *argv], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "search" in imported or "search.run" in imported or any(m.startswith("search") for m in imported)
    assert not {m for m in imported if m.split(".")[0] in ("tensorflow", "keras", "keras_tuner")}
    assert "Traceback" not in done.stderr


def test_every_runner_follows_the_protocol():
    from runners.protocol import RUNNERS, Runner, RunnerConfigError, runner_named

    for name in RUNNERS:
        assert isinstance(runner_named(name), Runner)
    with pytest.raises(RunnerConfigError, match="unknown model 'nope'"):
        runner_named("nope")


def test_no_module_outgrows_one_job():
    sizes = {path.relative_to(ROOT).as_posix(): len(path.read_text().splitlines())
             for path in modules().values() if path.parts[-2] != "bench"}
    one_job = {"runners/photos.py",  # reading photo folders, archives and every image format safely
               "search/space.py"}    # reading a space file and checking every key of it, with the fix in the message
    assert not {k: v for k, v in sizes.items() if v > 450 and k not in one_job}
