"""The layout the code promises a reader (STYLE.md, "Core and support" and "Read in one sitting,
copy in one file"): every support/ leaf imports nothing of the project but support/errors.py
and copies alone or with it as support/__init__.py says, the copy units run copied alone, the project's modules import each other without a cycle, and
the main files stay within their budgets of formatted lines.

model.py and decode.py have copy-alone tests of their own (tests/test_copy_model.py,
tests/test_copy_decode.py); Adafactor and the FSDP2 wrapper are proven here."""

import ast
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = ("promot", "model", "data", "evaluate", "diagnostics", "decode", "checks")
LEAVES = sorted(
    f[:-3]
    for f in os.listdir(os.path.join(ROOT, "support"))
    if f.endswith(".py") and f != "__init__.py"
)
# Non-blank lines of ruff-formatted code, line length 100 (DESIGN.md); CI runs `ruff format --check`.
BUDGETS = {
    "promot.py": 700,
    "model.py": 650,
    "data.py": 900,
    "evaluate.py": 700,
    "causal_lm.py": 400,
}
COPY_UNITS = ("model.py", "decode.py", "support/adafactor.py", "support/fsdp.py")


def project_imports(path):
    """The project modules a file imports ('support.x' for the leaves)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [
                node.module + "." + a.name if node.module == "support" else node.module
                for a in node.names
            ]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in MAIN + ("support", "lab")}
    return found


def run_alone(folder, script, *argv, launcher=()):
    """Run `script` in `folder` with a Python that cannot see the project (-E, cwd=folder)."""
    (folder / "run_me.py").write_text(textwrap.dedent(script))
    cmd = [*launcher, "run_me.py", *argv] if launcher else [sys.executable, "-E", "run_me.py"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(cmd, cwd=folder, capture_output=True, text=True, env=env, timeout=300)


def test_each_support_leaf_imports_alone_with_at_most_the_errors_module(tmp_path):
    """Each leaf in a folder of its own (with support/errors.py, the one sibling a leaf may
    import), imported by a Python that cannot see the project."""
    for leaf in LEAVES:
        imports = project_imports(os.path.join(ROOT, "support", f"{leaf}.py"))
        assert imports <= {"support.errors"}, (leaf, imports)
        (tmp_path / leaf / "support").mkdir(parents=True)
        shutil.copy(os.path.join(ROOT, "support", f"{leaf}.py"), tmp_path / leaf / f"{leaf}.py")
        shutil.copy(os.path.join(ROOT, "support", "errors.py"), tmp_path / leaf / "support")
    script = """
        import importlib.util, os, sys
        for leaf in sys.argv[1:]:
            sys.path.insert(0, os.path.abspath(leaf))
            spec = importlib.util.spec_from_file_location(leaf, f'{leaf}/{leaf}.py')
            module = sys.modules[leaf] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.path.pop(0)
    """
    (tmp_path / "run_me.py").write_text(textwrap.dedent(script))
    result = subprocess.run(
        [sys.executable, "-E", "run_me.py", *LEAVES], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def copy_groups():
    """(the leaves support/__init__.py says copy alone, those it says need support/errors.py)."""
    source = open(os.path.join(ROOT, "support", "__init__.py"), encoding="utf-8").read()
    alone, with_errors = (
        ast.get_docstring(ast.parse(source))
        .split("\nCopied alone")[1]
        .split("\nCopied with support/errors.py")
    )
    return [re.findall(r"^  (\w+)\.py ", part, re.M) for part in (alone, with_errors)]


def test_the_support_docstring_says_how_each_leaf_copies_once():
    alone, with_errors = copy_groups()
    assert sorted(alone + with_errors) == LEAVES


def test_each_leaf_copies_as_the_support_docstring_says(tmp_path):
    """In a folder that holds only it: a leaf said to copy alone imports, one said to need
    support/errors.py fails for want of `support` (copied with it: the test above)."""
    for leaf in LEAVES:
        (tmp_path / leaf).mkdir()
        shutil.copy(os.path.join(ROOT, "support", f"{leaf}.py"), tmp_path / leaf)
    script = """
        import importlib, os, sys
        for leaf in sys.argv[1:]:
            sys.path.insert(0, os.path.abspath(leaf))
            try:
                importlib.import_module(leaf)
                print(leaf, "imports")
            except ModuleNotFoundError as e:
                print(leaf, "needs", e.name)
            sys.path.pop(0)
    """
    (tmp_path / "run_me.py").write_text(textwrap.dedent(script))
    result = subprocess.run(
        [sys.executable, "-E", "run_me.py", *LEAVES], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    alone, with_errors = copy_groups()
    said = {**{n: "imports" for n in alone}, **{n: "needs support" for n in with_errors}}
    found = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert found == said


@pytest.mark.parametrize("unit", ["support/adafactor.py", "support/fsdp.py"])
def test_the_leaf_copy_units_import_nothing_of_the_project(unit):
    assert project_imports(os.path.join(ROOT, unit)) == set()


def test_adafactor_copied_alone_trains_a_linear_layer(tmp_path):
    shutil.copy(os.path.join(ROOT, "support", "adafactor.py"), tmp_path)
    result = run_alone(
        tmp_path,
        """
        import torch
        from adafactor import Adafactor
        torch.manual_seed(0)
        layer, x = torch.nn.Linear(8, 4), torch.randn(32, 8)
        y = x @ torch.randn(8, 4)
        opt = Adafactor(layer.parameters(), lr=0.1)
        losses = []
        for _ in range(20):
            loss = ((layer(x) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < 0.5 * losses[0], losses
        print("ok")
        """,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_fsdp_copied_alone_shards_a_model_on_two_ranks_and_gathers_it_back(tmp_path):
    shutil.copy(os.path.join(ROOT, "support", "fsdp.py"), tmp_path)
    script = """
        import torch, torch.distributed as dist
        import fsdp
        torch.manual_seed(0)
        where = fsdp.setup_distributed("cpu")
        model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Linear(6, 2))
        full = {k: v.clone() for k, v in model.state_dict().items()}
        fsdp.shard_model(model, where.mesh, list(model))
        gathered = fsdp.full_state_dict(model)
        if where.main:
            assert sorted(gathered) == sorted(full)
            assert all(torch.equal(gathered[k].cpu(), full[k]) for k in full)
            print("ok", where.world)
        dist.destroy_process_group()
    """
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    result = run_alone(tmp_path, script, launcher=torchrun)
    assert result.returncode == 0 and "ok 2" in result.stdout, result.stderr[-3000:]


def test_the_project_modules_import_each_other_without_a_cycle():
    graph = {
        m: {
            i.split(".")[0] if not i.startswith("support.") else i
            for i in project_imports(os.path.join(ROOT, f"{m}.py"))
        }
        for m in MAIN
        if os.path.exists(os.path.join(ROOT, f"{m}.py"))
    }
    graph.update({f"support.{leaf}": set() for leaf in LEAVES})

    def reaches(start, target, seen=()):
        return any(
            n == target or (n not in seen and reaches(n, target, seen + (n,)))
            for n in graph.get(start, ())
            if n in graph
        )

    assert [m for m in graph if reaches(m, m)] == []
    # checks.py and the copy unit decode.py sit below the main files: they import none of them.
    for low in ("checks", "decode"):
        assert not {i for i in graph.get(low, ()) if i in MAIN}, graph.get(low)


@pytest.mark.parametrize("name", sorted(BUDGETS))
def test_main_files_stay_within_their_line_budgets(name):
    lines = [line for line in open(os.path.join(ROOT, name), encoding="utf-8") if line.strip()]
    assert len(lines) <= BUDGETS[name], (
        f"{name}: {len(lines)} non-blank lines, budget {BUDGETS[name]}"
    )


@pytest.mark.parametrize("name", sorted(BUDGETS) + ["decode.py", "diagnostics.py", "checks.py"])
def test_no_line_is_over_100_characters_and_no_function_over_80_lines(name):
    source = open(os.path.join(ROOT, name), encoding="utf-8").read()
    lines = source.split("\n")
    assert [i + 1 for i, line in enumerate(lines) if len(line) > 100] == []
    long = [
        (node.name, n)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for n in [sum(1 for line in lines[node.lineno - 1 : node.end_lineno] if line.strip())]
        if n > 80
    ]
    assert long == []


def test_one_stage_is_one_function_a_reader_sees_whole():
    """Issue 27: promot.run_stage (load, prompts, optimizer, resume, loop, export) fits 40
    lines; LoRA, an appendix ablation, is named at most 12 times in promot.py; promot.py has
    at most 45 flags (diagnostics' and LoRA's included, under their own headings)."""
    source = open(os.path.join(ROOT, "promot.py"), encoding="utf-8").read()
    lines = source.split("\n")
    (stage,) = [n for n in ast.parse(source).body if getattr(n, "name", "") == "run_stage"]
    body = [line for line in lines[stage.lineno - 1 : stage.end_lineno] if line.strip()]
    assert len(body) <= 40, len(body)
    assert len(re.findall("lora|adapter", source, flags=re.IGNORECASE)) <= 12
    out = subprocess.run(
        [sys.executable, "promot.py", "--help"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    flags = set(re.findall(r"^  (--[a-z0-9-]+)", out, flags=re.MULTILINE))
    assert len(flags) <= 45, sorted(flags)
    assert {"--lora-rank", "--probe-every"} <= flags  # under their own headings
    assert "App. C.7" in out and "§3 measurements" in out


def test_checks_sit_at_the_command_boundary():
    """Issue 27: checks.py imports at its top only and takes no module as an argument; data.py's
    code calls it at most 3 times."""
    tree = ast.parse(open(os.path.join(ROOT, "checks.py"), encoding="utf-8").read())
    local = [
        (f.name, node.lineno)
        for f in ast.walk(tree)
        if isinstance(f, ast.FunctionDef)
        for node in ast.walk(f)
        if isinstance(node, (ast.Import, ast.ImportFrom))
    ]
    assert local == []
    modules = [a.arg for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) for a in f.args.args]
    assert not [m for m in modules if m.endswith("_lib") or m in ("module", "model_lib")]
    code = ast.parse(open(os.path.join(ROOT, "data.py"), encoding="utf-8").read())
    calls = [
        n
        for n in ast.walk(code)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "checks"
    ]
    assert len(calls) <= 3, [c.attr for c in calls]
