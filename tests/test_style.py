"The exported package reads easily: one statement per line, lines of at most 120 characters."
import io
import tokenize
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "r1_scratch"
MODULES = sorted(p for p in PACKAGE.glob("*.py") if p.name != "_modidx.py")
LIMIT = 120


def semicolons(source: str) -> list[int]:
    "Line numbers of statements joined by `;` (a `;` token, never one inside a string or comment)."
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return [t.start[0] for t in tokens if t.type == tokenize.OP and t.string == ";"]


def long_lines(source: str) -> list[int]:
    "Line numbers over the limit; nbdev writes `__all__` on one line, so that line is not ours to wrap."
    return [i for i, line in enumerate(source.splitlines(), 1) if len(line) > LIMIT and not line.startswith("__all__")]


def test_the_checks_catch_what_they_look_for():
    assert semicolons("a = 1; b = 2\ns = 'x; y'  # c; d\n") == [1]
    assert long_lines("x = 1\n" + "y = '" + "z" * 130 + "'\n") == [2]


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.name)
def test_exported_code_style(module):
    source = module.read_text()
    assert semicolons(source) == [], f"{module.name}: statements joined by ';' on lines {semicolons(source)}"
    assert long_lines(source) == [], f"{module.name}: lines over {LIMIT} characters: {long_lines(source)}"
