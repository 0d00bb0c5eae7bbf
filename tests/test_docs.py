"""Every command and option that README.md, docs/*.md and the walkthrough name exists.

The code of those files is read: fenced blocks (not the walkthrough's ```python and ```py, which
test_walkthrough.py runs and checks) and `inline` spans. In it:
- `python -m X` (also `torchrun ... -m X`): X can be run, and X's module or package imports;
- every --option given to such a command is one that X's parser accepts (torchrun's own options,
  those before -m, torchrun's);
- every --option named alone, in prose, is accepted by some entry point, and a --section.field
  one by `python -m minimal_amkp`'s;
- every `make TARGET` is a target of the Makefile.
Options in capitals are placeholders (`--SECTION.FIELD`); `--mine.*` and `--mine.FIELD` name a
section, which must exist. No command runs: each entry point builds its parser and is stopped
where it would parse (argparse's parse_known_args), so the test takes a second and trains nothing.
"""
import argparse
import functools
import importlib
import importlib.util
import re
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "walkthrough" / "walkthrough.md"]
PROJECT = ("minimal_amkp", "bench", "kernels", "walkthrough")

FENCE = re.compile(r"^```([\w-]*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
INLINE = re.compile(r"(?<!`)`(?!`)((?:[^`\n]|\n(?!\n))+)`(?!`)")
# A command: python (any path to it) or torchrun, torchrun's options, then -m and the module.
COMMAND = re.compile(r"(?<![\w.$-])(?P<prog>(?:\S*/)?python3?|torchrun)\b(?P<pre>[^\n]*?)\s-m\s+(?P<module>[A-Za-z_][\w.]*)")
OPTION = re.compile(r"(?<![\w-])--(?P<name>[A-Za-z][\w-]*(?:\.[\w*-]+)?)")
MAKE = re.compile(r"(?<![\w/.-])make\s+(?P<target>[a-z][\w-]*)")
# Where a shell command line ends: a comment, or the next command after ; or &&.
END = re.compile(r"(?:^|\s)#|;|&&")


class _Parsing(Exception):
    def __init__(self, parser):
        super().__init__(parser.prog)
        self.parser = parser


def stopped_at_parse(fn, *args):
    """The argparse parser that fn(*args) builds, taken where it would parse (nothing after runs)."""
    def stop(parser, *a, **k):
        raise _Parsing(parser)
    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", stop):
        try:
            fn(*args)
        except _Parsing as e:
            return e.parser
    raise AssertionError(f"{fn.__module__}.{fn.__qualname__} returned without parsing a command line")


def _run():
    from minimal_amkp.run.cli import build_parser
    return build_parser()


def _from(module, function):
    return lambda: stopped_at_parse(getattr(importlib.import_module(module), function), [])


# Each entry point's parsers: the options it takes itself, and those it hands on. fork, reproduce
# and kill_resume pass every option they do not know to the runs they make (cli.parse).
ENTRY_POINTS = {
    "minimal_amkp": [_run],
    "minimal_amkp.study.fork": [_run],
    "minimal_amkp.study.reproduce": [_from("minimal_amkp.study.reproduce", "parse"), _run],
    "minimal_amkp.study.kill_resume": [_from("minimal_amkp.study.kill_resume", "parse"), _run],
    "minimal_amkp.study.regrid": [_from("minimal_amkp.study.regrid", "main")],
    "minimal_amkp.data.phantom": [_from("minimal_amkp.data.phantom", "main")],
    "bench": [_from("bench.__main__", "parse_args")],
    "bench.gpu_check": [_from("bench.gpu_check", "parse_args")],
    "kernels.compile_check": [_from("kernels.compile_check", "main")],
    "walkthrough.make_figures": [_from("walkthrough.make_figures", "main")],
    "torchrun": [lambda: importlib.import_module("torch.distributed.run").get_args_parser()],
}


@functools.cache
def options_of(entry):
    """Every option string the entry point's parsers accept."""
    return frozenset(s for make in ENTRY_POINTS[entry] for s in make()._option_string_actions)


def accepts(known, name):
    """Does an option set take --name? A placeholder in capitals is taken; --section.* or
    --section.FIELD needs the section only."""
    section, _, field = name.partition(".")
    if section != section.lower():
        return True
    if field and (field == "*" or field != field.lower()):
        return any(s.startswith(f"--{section}.") for s in known)
    return f"--{name}" in known


def code_regions(text):
    """(offset in text, code) of every fenced block but python/py and of every inline span outside
    the blocks; a shell line continued with "\\", or a usage line continued by an indented "[",
    is joined to the line before (offsets kept, so line numbers stay right)."""
    regions = []
    for m in FENCE.finditer(text):
        if m.group(1) not in ("python", "py"):
            code = m.group(2).replace("\\\n", "  ")
            regions.append((m.start(2), re.sub(r"\n(?=[ \t]+\[)", " ", code)))
    prose = FENCE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)
    regions += [(m.start(1), m.group(1).replace("\n", " ")) for m in INLINE.finditer(prose)]
    return regions


def mentions(text):
    """What the code of a Markdown text names: [(offset, kind, what, options)], kind "command"
    (what: the module, or "torchrun"; options: [(offset, name)] given to it), "option" (named
    alone) or "make" (what: the target)."""
    out = []
    for start, code in code_regions(text):
        for line in re.finditer(r"[^\n]+", code):
            pos = 0
            for end in [*END.finditer(line.group(0)), None]:
                stop = len(line.group(0)) if end is None else end.start()
                out += _segment(line.group(0)[pos:stop], start + line.start() + pos)
                if end is None or "#" in end.group(0):
                    break
                pos = end.end()
    return out


def _segment(line, at):
    """mentions() of one shell command line (no comment, no ; or &&) that starts at offset `at`."""
    found, taken = [], set()
    commands = list(COMMAND.finditer(line))
    for k, m in enumerate(commands):
        stop = commands[k + 1].start() if k + 1 < len(commands) else len(line)
        if m.group("prog") == "torchrun":
            own = [(at + o.start(), o.group("name")) for o in OPTION.finditer(line, m.start("pre"), m.end("pre"))]
            found.append((at + m.start("prog"), "command", "torchrun", own))
        given = [(at + o.start(), o.group("name")) for o in OPTION.finditer(line, m.end("module"), stop)]
        found.append((at + m.start("module"), "command", m.group("module"), given))
        taken.update(range(m.start(), stop))
    found += [(at + o.start(), "option", o.group("name"), []) for o in OPTION.finditer(line) if o.start() not in taken]
    found += [(at + mk.start("target"), "make", mk.group("target"), []) for mk in MAKE.finditer(line)]
    return found


def runnable(module):
    """None if `python -m module` can run (a module, or a package with __main__.py, that imports);
    else what is wrong."""
    if module == "torchrun":
        return None
    try:
        spec = importlib.util.find_spec(module)
        if spec is None:
            return "no such module"
        if spec.submodule_search_locations is not None and importlib.util.find_spec(f"{module}.__main__") is None:
            return "a package without __main__.py"
        importlib.import_module(module)            # a package's __init__, never its __main__
    except Exception as e:                          # noqa: BLE001  (whatever stops the import is the answer)
        return f"does not import ({type(e).__name__}: {e})"
    return None


def makefile_targets():
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M))


def problems(path):
    """One line per command, option or make target in the file's code that does not exist,
    each naming the file, the line and what is wrong."""
    text = path.read_text(encoding="utf-8")
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path

    def where(offset):
        return f"{name}:{text.count(chr(10), 0, offset) + 1}"
    everything = set().union(*(options_of(e) for e in ENTRY_POINTS))
    out = []
    for offset, kind, what, given in mentions(text):
        if kind == "make" and what not in makefile_targets():
            out.append(f"{where(offset)}: make {what}: the Makefile has no such target")
        elif kind == "option" and not accepts(options_of("minimal_amkp") if "." in what else everything, what):
            taker = "python -m minimal_amkp" if "." in what else "any entry point"
            out.append(f"{where(offset)}: --{what}: not an option of {taker}")
        elif kind == "command":
            command = what if what == "torchrun" else f"python -m {what}"
            wrong = runnable(what)
            if wrong:
                out.append(f"{where(offset)}: {command}: {wrong}")
            elif what in ENTRY_POINTS:
                out += [f"{where(o)}: --{option}: not an option of {command}" for o, option in given
                        if not accepts(options_of(what), option)]
            elif given and what.split(".")[0] in PROJECT:
                out.append(f"{where(offset)}: {command}: its parser is not in tests/test_docs.py's ENTRY_POINTS")
    return out


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_option_and_make_target_the_docs_name_exists(path):
    found = problems(path)
    assert not found, "\n".join(found)


def test_the_docs_are_read():
    """The scan finds what the docs name, so the test above cannot pass by reading nothing."""
    kinds = {}
    for path in DOCS:
        for _, kind, what, given in mentions(path.read_text(encoding="utf-8")):
            kinds.setdefault(kind, set()).add(what)
    assert {"minimal_amkp", "minimal_amkp.study.fork", "minimal_amkp.study.reproduce", "bench",
            "walkthrough.make_figures", "torchrun"} <= kinds["command"]
    assert {"mine.kp", "resume", "init"} <= kinds["option"] and {"test", "run", "figures"} <= kinds["make"]


def test_made_up_commands_options_and_targets_are_caught(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# A page\n\n```sh\n"
                   "python -m minimal_amkp --mine.kp none --mine.made-up 3   # --not-checked: a comment\n"
                   "torchrun --standalone --no-such-rdzv -m minimal_amkp \\\n"
                   "    --preset paper --skip-bad-imagez\n"
                   "```\n\n"
                   "Then `--mine.lam 0.5`, `--train.nothing`, `--quick`, `--never-heard`, `--SECTION.FIELD`,\n"
                   "`--mine.*`, `--nosection.*`, `make figures`, `make all-of-it`, `python -m minimal_amkp.nowhere`,\n"
                   "`python -m walkthrough.make_figures --run DIR --colour red` and `python -m bench --quick`.\n",
                   encoding="utf-8")
    assert problems(doc) == [
        f"{doc}:4: --mine.made-up: not an option of python -m minimal_amkp",
        f"{doc}:5: --no-such-rdzv: not an option of torchrun",
        f"{doc}:6: --skip-bad-imagez: not an option of python -m minimal_amkp",
        f"{doc}:9: --train.nothing: not an option of python -m minimal_amkp",
        f"{doc}:9: --never-heard: not an option of any entry point",
        f"{doc}:10: --nosection.*: not an option of python -m minimal_amkp",
        f"{doc}:10: make all-of-it: the Makefile has no such target",
        f"{doc}:10: python -m minimal_amkp.nowhere: no such module",
        f"{doc}:11: --colour: not an option of python -m walkthrough.make_figures",
    ]
