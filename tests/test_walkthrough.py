"""walkthrough/walkthrough.md runs: every ```python block, in order, in one shared namespace.

The prose states numbers and the blocks assert them, so a number that drifts from the code fails
here. Each block is compiled under the Markdown file's own name and line numbers, so a traceback
points at the line of walkthrough.md that broke.
"""
import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "walkthrough" / "walkthrough.md"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
# Excerpts of the project's source: ```py, first line "# path/from/repo/root", "..." elides.
EXCERPT = re.compile(r"^```py[ \t]*\n# (\S+)\n(.*?)^```[ \t]*$", re.M | re.S)
# [text](target) and ![alt](target); absolute URLs and in-page anchors are not files.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
EQUATIONS = range(1, 9)
# Markdown sees math before MathJax does: a backslash before ASCII punctuation (\{, \|, \,, \\)
# is an escape that GitHub strips, so the math must spell those \lbrace, \lVert, ...
MARKDOWN_ESCAPE = re.compile(r"\\[!-/:-@\[-`{-~]")


def python_blocks(text):
    """[(line number of the block's first code line, source)] of every ```python block, in order."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in FENCE.finditer(text)]


def run_blocks(text, filename):
    """exec every block in order in one namespace; AssertionError naming the block that raised."""
    ns = {"__name__": "walkthrough_doc"}
    for i, (line, src) in enumerate(python_blocks(text)):
        code = compile("\n" * (line - 1) + src, filename, "exec")
        try:
            exec(code, ns)
        except Exception as e:
            first = next((s for s in src.splitlines() if s.strip()), "")
            raise AssertionError(f"{filename}: python block {i} (line {line}: {first.strip()!r}) "
                                 f"raised {type(e).__name__}: {e}") from e
    return ns


def excerpt_mismatch(excerpt, source):
    """None if each run of lines between "..." elisions occurs verbatim in `source`, in order;
    otherwise the first run that could not be placed, as text."""
    lines = [s.rstrip() for s in source.splitlines()]
    runs, run = [], []
    for s in excerpt.splitlines():
        if s.strip() == "...":
            runs, run = runs + [run] * bool(run), []
        else:
            run.append(s.rstrip())
    runs += [run] * bool(run)
    at = 0
    for run in runs:
        starts = [i for i in range(at, len(lines) - len(run) + 1) if lines[i:i + len(run)] == run]
        if not starts:
            return "\n".join(run)
        at = starts[0] + len(run)
    return None


def math_problems(text):
    """Lines whose inline $...$ math spans a line break, and math holding a Markdown escape."""
    prose = re.sub(r"^```.*?^```[ \t]*$", "", text, flags=re.M | re.S)
    display = re.findall(r"\$\$(.+?)\$\$", prose, re.S)
    rest = re.sub(r"\$\$.+?\$\$", "", prose, flags=re.S)
    split = [line for line in rest.splitlines() if line.count("$") % 2]
    inline = re.findall(r"\$([^$\n]+)\$", rest)
    return split, [m for m in display + inline if MARKDOWN_ESCAPE.search(m)]


def test_every_python_block_runs_in_order():
    text = DOC.read_text(encoding="utf-8")
    assert len(python_blocks(text)) >= 20, "the walkthrough lost most of its code blocks"
    run_blocks(text, str(DOC))


def test_a_failing_block_is_named_by_index_line_and_first_line():
    text = "# t\n\n```python\na = 1\n```\n\nprose\n\n```python\n# second\nassert a == 2, 'a drifted'\n```\n"
    with pytest.raises(AssertionError, match=r"python block 1 \(line 10: '# second'\) raised "
                                             r"AssertionError: a drifted"):
        run_blocks(text, "doc.md")


def test_later_blocks_see_earlier_names_and_other_fences_are_not_run():
    text = "```python\na = 2\n```\n```sh\nexit 1\n```\n```python\nb = a * 3\n```\n"
    assert run_blocks(text, "doc.md")["b"] == 6


def test_a_traceback_points_at_the_markdown_line():
    text = "intro\n\n```python\nx = 1\ny = 1 / 0\n```\n"
    with pytest.raises(AssertionError) as info:
        run_blocks(text, "doc.md")
    tb = info.value.__cause__.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    assert (tb.tb_frame.f_code.co_filename, tb.tb_lineno) == ("doc.md", 5)


def test_every_source_excerpt_still_matches_its_file():
    excerpts = EXCERPT.findall(DOC.read_text(encoding="utf-8"))
    assert len(excerpts) >= 5, "the walkthrough lost its source excerpts"
    stale = {}
    for path, body in excerpts:
        source = ROOT / path
        assert source.is_file(), f"excerpt names a missing file: {path}"
        bad = excerpt_mismatch(body, source.read_text(encoding="utf-8"))
        if bad is not None:
            stale[path] = bad
    assert not stale, f"excerpts no longer in their files (first unplaced run of lines): {stale}"


def test_an_edited_excerpt_is_caught():
    source = "def f(x):\n    y = x + 1\n    return y\n"
    assert excerpt_mismatch("def f(x):\n    ...\n    return y\n", source) is None
    assert excerpt_mismatch("    return y\n...\ndef f(x):\n", source) == "def f(x):"
    assert excerpt_mismatch("    y = x + 2\n", source) == "    y = x + 2"


def test_every_relative_link_and_figure_exists():
    text = DOC.read_text(encoding="utf-8")
    targets = [t.split("#")[0] for t in LINK.findall(text)
               if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    assert targets, "the walkthrough links no files"
    missing = [t for t in targets if not (DOC.parent / t).exists()]
    assert not missing, f"walkthrough.md links to missing files: {missing}"


def test_math_survives_githubs_markdown():
    split, escaped = math_problems(DOC.read_text(encoding="utf-8"))
    assert not split, f"inline math must open and close on one line: {split}"
    assert not escaped, f"math with a Markdown escape (write \\lbrace, \\lVert, ...): {escaped}"


def test_math_problems_are_found():
    split, escaped = math_problems("a $x$ b $y\nz$\n$$\\{x\\}$$\n```python\n$ \\{\n```\n")
    assert split == ["a $x$ b $y", "z$"] and escaped == ["\\{x\\}"]


def test_every_equation_of_the_paper_is_written_out():
    text = DOC.read_text(encoding="utf-8")
    missing = [k for k in EQUATIONS if f"\\tag{{{k}}}" not in text]
    assert not missing, f"walkthrough.md has no \\tag{{k}} display for equations {missing}"


def test_make_figures_rejects_a_broken_run_in_one_line(tmp_path):
    from walkthrough import make_figures

    np.savez(tmp_path / "mining.npz", names=np.array(["a.png"]), labels=np.zeros((1, 14)))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"^make_figures: --run .*: mining: missing keys "
                                         r"\['cams', 'masks', 'image_size', 'grid'\]$"):
        make_figures.main(["--run", str(tmp_path), "--out", str(tmp_path / "figures")])
    (tmp_path / "mining.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(SystemExit, match=r"^make_figures: --run .*: File is not a zip file$"):
        make_figures.main(["--run", str(tmp_path), "--out", str(tmp_path / "figures")])
    assert not (tmp_path / "figures").exists()
