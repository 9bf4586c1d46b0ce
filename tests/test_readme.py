"""The README's Python code blocks run, so its examples cannot drift from the library.

Every ```` ```python ```` block of README.md runs, in order, in one namespace (later blocks use
the names earlier ones define, as a reader would), in a scratch directory, in a fresh interpreter.
A block that fails is named by its first line number in README.md.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"

_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(first line number, code)`` of every python block."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _FENCE.finditer(text)]


def _script(blocks: list[tuple[int, str]]) -> str:
    parts = ["import sys", "_ns = {'__name__': '__readme__'}"]
    for line, code in blocks:
        parts.append(textwrap.dedent(f"""
            try:
                exec(compile({code!r}, 'README.md:{line}', 'exec'), _ns)
            except BaseException:
                print('README.md block at line {line} failed', file=sys.stderr)
                raise
        """))
    return "\n".join(parts)


def test_the_readme_has_python_blocks_and_the_extractor_finds_them() -> None:
    text = "x\n```python\na = 1\n```\ny\n```bash\nls\n```\n```python\nb = a + 1\n```\n"
    assert python_blocks(text) == [(3, "a = 1\n"), (10, "b = a + 1\n")]
    assert len(python_blocks(README.read_text())) >= 8


def test_every_python_block_of_the_readme_runs(tmp_path: Path) -> None:
    blocks = python_blocks(README.read_text())
    script = tmp_path / "readme_blocks.py"
    script.write_text(_script(blocks))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(README.parent)})
    assert proc.returncode == 0, proc.stderr[-4000:]
