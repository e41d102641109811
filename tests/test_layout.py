"""The layout the code promises a reader (STYLE.md, "Core and support"): every support/
module works copied alone, the project's modules import each other without a cycle,
and the four main files stay within their budgets."""

import ast
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = ("promot", "model", "data", "evaluate", "diagnostics")
LEAVES = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "support")) if f.endswith(".py") and f != "__init__.py")
BUDGETS = {"promot.py": 650, "model.py": 620, "data.py": 850, "evaluate.py": 650}  # non-blank lines (DESIGN.md)


def project_imports(path):
    """The project modules a file imports ('support.x' for the leaves)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module + "." + a.name if node.module == "support" else node.module for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in MAIN + ("support", "lab")}
    return found


def test_each_support_module_works_copied_alone(tmp_path):
    """Each leaf in a folder of its own, imported by a Python that cannot see the project."""
    for leaf in LEAVES:
        assert project_imports(os.path.join(ROOT, "support", f"{leaf}.py")) == set(), leaf
        (tmp_path / leaf).mkdir()
        shutil.copy(os.path.join(ROOT, "support", f"{leaf}.py"), tmp_path / leaf / f"{leaf}.py")
    script = ("import importlib.util, sys\n"
              "for leaf in sys.argv[1:]:\n"
              "    spec = importlib.util.spec_from_file_location(leaf, f'{leaf}/{leaf}.py')\n"
              "    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n")
    result = subprocess.run([sys.executable, "-E", "-c", script, *LEAVES], cwd=tmp_path, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr


def test_the_project_modules_import_each_other_without_a_cycle():
    graph = {m: {i.split(".")[0] if not i.startswith("support.") else i for i in
                 project_imports(os.path.join(ROOT, f"{m}.py"))} for m in MAIN}
    graph.update({f"support.{leaf}": set() for leaf in LEAVES})

    def reaches(start, target, seen=()):
        return any(n == target or (n not in seen and reaches(n, target, seen + (n,)))
                   for n in graph.get(start, ()) if n in graph)
    assert [m for m in MAIN if reaches(m, m)] == []
    assert not any(i.split(".")[0] in MAIN for leaf in LEAVES
                   for i in project_imports(os.path.join(ROOT, "support", f"{leaf}.py")))


@pytest.mark.parametrize("name", sorted(BUDGETS))
def test_main_files_stay_within_their_line_budgets(name):
    lines = [line for line in open(os.path.join(ROOT, name), encoding="utf-8") if line.strip()]
    assert len(lines) <= BUDGETS[name], f"{name}: {len(lines)} non-blank lines, budget {BUDGETS[name]}"


@pytest.mark.parametrize("name", sorted(BUDGETS))
def test_no_function_in_the_main_files_is_longer_than_80_lines(name):
    source = open(os.path.join(ROOT, name), encoding="utf-8").read()
    lines = source.split("\n")
    long = [(node.name, n) for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            for n in [sum(1 for line in lines[node.lineno - 1:node.end_lineno] if line.strip())] if n > 80]
    assert long == []
