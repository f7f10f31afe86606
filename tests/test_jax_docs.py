"""The JAX examples of docs/JAX.md and docs/HYBRID.md run as written (in child processes, like
every JAX test)."""

from __future__ import annotations

import os
import subprocess
import sys

from jax_harness import REPO_ROOT, child_env, require_jax


def _run_example(tmp_path, doc: str, after: str = ""):
    text = open(os.path.join(REPO_ROOT, "docs", doc)).read()
    begin = text.index(after) if after else 0
    start = text.index("```python\n", begin) + len("```python\n")
    script = tmp_path / "example.py"
    script.write_text(text[start : text.index("```", start)])
    proc = subprocess.run(
        [sys.executable, str(script)], env=child_env(4), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_docs_example_runs(tmp_path):
    require_jax()
    assert "(64, 64) (64, 64) (64, 2) (8, 64, 64)" in _run_example(tmp_path, "JAX.md")


def test_hybrid_docs_example_runs(tmp_path):
    require_jax()
    out = _run_example(tmp_path, "HYBRID.md", after="### JAX (static shapes)")
    assert "(64, 128) False (64, 128) (64, 8) (8, 128, 128)" in out
