"""README.md's Python examples run as printed (the docs must work when pasted)."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block(after: str) -> str:
    text = README.read_text()
    return text[text.index(after):].split("```python", 1)[1].split("```", 1)[0]


def test_engine_example_reuses_swapped_documents():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(_python_block("Or the engine alone"), "README.md", "exec"), {})
    text, counts = out.getvalue().strip().splitlines()[-2:]
    prompt, reused, recomputed, ttft = counts.split()
    assert text.strip()
    assert int(reused) >= 0.9 * int(prompt)  # the swapped documents are found, not only the prefix
    assert 0 < int(recomputed) < int(reused) and float(ttft) > 0
