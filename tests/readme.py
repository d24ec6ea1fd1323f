"""README.md's code blocks, for the tests that run them.

Every fenced code block of README.md carries a name on the line just above it::

    <!-- test: NAME -->
    ```python

A test runs block NAME by calling one of this module's functions with NAME as its first argument,
written as a string literal (``readme.run_python("NAME", ...)``, ``readme.block("NAME")``):
``tests/test_readme.py`` finds those calls in the tests' source and fails for a block that no
test runs and that its ``NOT_RUN`` does not list with a reason. To add a block: name it, then
either write the test (any test file; ``tests/test_readme.py`` holds most) or list it in
``NOT_RUN``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import re
import shlex
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
NAME_LINE = re.compile(r"<!-- test: ([a-z0-9][a-z0-9-]*) -->")
FENCE = re.compile(r"(`{3,})([\w+-]*)\s*")


@dataclasses.dataclass(frozen=True)
class Block:
    name: str | None
    """From the ``<!-- test: NAME -->`` line just above the fence; None without one."""
    language: str
    """The fence's info string: ``python``, ``bash`` or empty (a transcript or a listing)."""
    text: str
    line: int
    """The line number of the opening fence in README.md."""


def parse(text: str) -> list[Block]:
    """The fenced blocks of a Markdown ``text``, in order."""
    lines = text.splitlines()
    blocks, index = [], 0
    while index < len(lines):
        fence = FENCE.fullmatch(lines[index])
        if fence is None:
            index += 1
            continue
        end = next(
            (stop for stop in range(index + 1, len(lines)) if lines[stop].strip() == fence.group(1)), None
        )
        if end is None:
            raise ValueError(f"README.md:{index + 1}: a code block that is never closed")
        named = NAME_LINE.fullmatch(lines[index - 1].strip()) if index else None
        body = "\n".join(lines[index + 1 : end]) + "\n"
        blocks.append(Block(named and named.group(1), fence.group(2), body, index + 1))
        index = end + 1
    return blocks


@functools.cache
def blocks() -> tuple[Block, ...]:
    return tuple(parse(README.read_text()))


def block(name: str) -> Block:
    """The README block named ``name``."""
    found = [item for item in blocks() if item.name == name]
    if len(found) != 1:
        raise LookupError(f"README.md has {len(found)} blocks named {name!r}")
    return found[0]


def substituted(text: str, replacements: dict[str, str]) -> str:
    """``text`` with each key replaced by its value; each key must occur, so that a test cannot
    silently run something else after the README changes."""
    for old, new in replacements.items():
        if old not in text:
            raise AssertionError(f"the README block no longer contains {old!r}: update its test")
        text = text.replace(old, new)
    return text


def run_python(name: str, replacements: dict[str, str] | None = None, namespace: dict | None = None) -> dict:
    """Execute python block ``name`` (after ``replacements``: tiny local models for hub names,
    ``"cpu"`` for ``"cuda"``) in ``namespace`` (stand-ins for the names the block assumes);
    returns the namespace, for checks of what the block computed."""
    item = block(name)
    assert item.language == "python", f"README block {name!r} is {item.language or 'plain text'}"
    source = substituted(item.text, replacements or {})
    namespace = {"__name__": f"readme_{name.replace('-', '_')}", **(namespace or {})}
    exec(compile(source, f"README.md block {name!r} (line {item.line})", "exec"), namespace)
    return namespace


def command_lines(name: str) -> list[str]:
    """The commands of shell block ``name``: continuation lines joined, comments and blank lines
    dropped."""
    item = block(name)
    assert item.language == "bash", f"README block {name!r} is {item.language or 'plain text'}"
    joined = item.text.replace("\\\n", " ")
    return [
        " ".join(shlex.split(line, comments=True))
        for line in joined.splitlines()
        if line.split("#")[0].strip()
    ]


def transcript(name: str) -> list[tuple[str, list[str], bool]]:
    """The commands of transcript block ``name`` (lines ``$ command``, then what it prints;
    ``...`` stands for lines not shown, ``^C`` for a Ctrl-C): ``(command, lines shown,
    interrupted)`` each."""
    item = block(name)
    assert item.language == "", f"README block {name!r} is {item.language}, not a transcript"
    steps = []
    for line in item.text.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], [], False))
        elif line == "^C":
            steps[-1] = (steps[-1][0], steps[-1][1], True)
        elif line != "...":
            steps[-1][1].append(line)
    return steps


@dataclasses.dataclass
class Result:
    code: int
    out: str
    err: str


def run_simcse_fast(command: str, replacements: dict[str, str] | None = None) -> Result:
    """Run a ``simcse-fast ...`` command line in this process (PyTorch is imported already: a
    subprocess would pay seconds for it), with ``sys.argv`` as the command sees it, capturing
    its output."""
    words = shlex.split(substituted(command, replacements or {}))
    assert words[0] == "simcse-fast", f"not a simcse-fast command: {command}"
    from simcse_fast import cli

    out, err = io.StringIO(), io.StringIO()
    saved_argv = sys.argv
    sys.argv = words
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(words[1:])
    finally:
        sys.argv = saved_argv
    return Result(code, out.getvalue(), err.getvalue())
