"""The package's layout: the core (the method) never imports the shell (everything around it).

Core: the top-level modules of minimal_amkp/ (but __main__.py, the door to the command line),
minimal_amkp/reference/ and kernels/. Shell: minimal_amkp/run/, minimal_amkp/data/,
minimal_amkp/study/, bench/ and walkthrough/. The shell
may import the core; the other way round, the method would depend on files, processes or
command lines. Every import is walked, also those inside functions.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHELL = ("minimal_amkp.run", "minimal_amkp.data", "minimal_amkp.study", "bench", "walkthrough")
CORE = sorted(p for p in [*ROOT.glob("minimal_amkp/*.py"), *ROOT.glob("minimal_amkp/reference/*.py"),
                          *ROOT.glob("kernels/*.py")] if p.name != "__main__.py")
MODULES = sorted(p for d in ("minimal_amkp", "kernels", "bench", "walkthrough") for p in (ROOT / d).rglob("*.py"))
# "About 350 lines", one module for one sitting; the ceiling leaves room for kernels/masked_cam.py
# (about 440), which keeps its forward and backward kernels side by side as Triton's tutorials do.
MAX_LINES = 450


def module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path):
    """(line, imported module) for every import statement in the file, relative ones resolved."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            yield from ((node.lineno, f"{base}.{a.name}") for a in node.names)


def is_shell(name):
    return any(name == s or name.startswith(s + ".") for s in SHELL)


def test_the_walk_finds_the_core_and_a_shell_import():
    names = {module_name(p) for p in CORE}
    assert {"minimal_amkp.mine", "minimal_amkp.model", "minimal_amkp.reference.am", "kernels.launch"} <= names
    cli = ROOT / "minimal_amkp" / "run" / "cli.py"
    assert any(is_shell(name) for _, name in imports(cli)), "the walk misses the CLI's shell imports"


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_core_module_imports_the_shell(path):
    bad = [f"line {line}: {name}" for line, name in imports(path) if is_shell(name)]
    assert not bad, f"{path.relative_to(ROOT)} (core) imports the shell: {'; '.join(bad)}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_says_what_it_is_and_fits_one_sitting(path):
    text = path.read_text(encoding="utf-8")
    assert ast.get_docstring(ast.parse(text)), f"{path.relative_to(ROOT)} opens with no docstring"
    lines = text.count("\n")
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines (> {MAX_LINES})"
