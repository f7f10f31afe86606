"""The example of docs/JAX.md runs as written (in a child process, like every JAX test)."""

from __future__ import annotations

import os
import subprocess
import sys

from jax_harness import REPO_ROOT, child_env, require_jax


def test_docs_example_runs(tmp_path):
    require_jax()
    text = open(os.path.join(REPO_ROOT, "docs", "JAX.md")).read()
    start = text.index("```python\n") + len("```python\n")
    script = tmp_path / "example.py"
    script.write_text(text[start : text.index("```", start)])
    proc = subprocess.run(
        [sys.executable, str(script)], env=child_env(4), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(64, 64) (64, 64) (64, 2) (8, 64, 64)" in proc.stdout
