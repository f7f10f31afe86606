"""The training examples (examples/): the MoE block trained in JAX and in PyTorch from the same
weights and data, both modes, a few steps on 2 CPU ranks: the loss goes down and the two
frameworks' curves agree step by step (examples/train_both.py checks both and plots them)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 10


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pytest.importorskip("jax")
    out = tmp_path_factory.mktemp("examples_out")
    env = dict(os.environ, FUSED_A2A_TIMEOUT_S="60")
    env.pop("XLA_FLAGS", None)
    cmd = [
        sys.executable,
        os.path.join(REPO, "examples", "train_both.py"),
        "--ranks",
        "2",
        "--steps",
        str(STEPS),
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    return proc, out


def _curve(out, name):
    path = out / f"{name}.json"
    assert path.exists(), f"{path.name} missing"
    return json.loads(path.read_text())


def test_train_both_ok(run):
    proc, out = run
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "OK: the curves agree" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"], summary
    assert (out / "losses.png").stat().st_size > 10_000


@pytest.mark.parametrize("mode", ["normal", "hybrid"])
def test_loss_decreases_and_frameworks_agree(run, mode):
    _, out = run
    jax_c, torch_c = _curve(out, f"jax_{mode}"), _curve(out, f"torch_{mode}")
    for c in (jax_c, torch_c):
        losses = np.asarray(c["losses"])
        assert losses.shape == (STEPS,) and np.all(np.isfinite(losses))
        assert losses[-3:].mean() < losses[:3].mean(), losses
        assert c["config"]["ranks"] == 2
    np.testing.assert_allclose(torch_c["losses"], jax_c["losses"], rtol=1e-5)


def test_modes_agree(run):
    _, out = run
    normal, hybrid = _curve(out, "jax_normal"), _curve(out, "jax_hybrid")
    np.testing.assert_allclose(hybrid["losses"], normal["losses"], rtol=1e-5)


def _python_blocks(path):
    text = open(path).read()
    blocks, start = [], 0
    while (start := text.find("```python\n", start)) >= 0:
        start += len("```python\n")
        end = text.index("```", start)
        blocks.append(text[start:end])
        start = end + 3
    return blocks


def test_readme_jax_example_is_the_tested_one():
    readme = _python_blocks(os.path.join(REPO, "README.md"))
    docs = _python_blocks(os.path.join(REPO, "docs", "JAX.md"))
    assert docs[0] in readme, "README's JAX example differs from docs/JAX.md's (tested) example"


def test_readme_torch_example_runs(tmp_path):
    from mp import free_port

    block = next(b for b in _python_blocks(os.path.join(REPO, "README.md")) if "mp.spawn(main" in b)
    script = tmp_path / "torch_example.py"
    script.write_text(block)
    expected = r"([01]) \(16, 64\) \(16, 64\) \(16, 64\) \(16, 2\) True"

    def run_example():
        env = dict(os.environ, MASTER_PORT=str(free_port()), FUSED_A2A_TIMEOUT_S="60")
        env.pop("PYTHONUNBUFFERED", None)  # unbuffered, the ranks' prints can interleave mid-line
        return subprocess.run(
            [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300
        )

    proc = run_example()
    # Once in a clean-clone CI run (session 10), a rank aborted at interpreter exit after both
    # ranks had printed their correct results and destroyed the process group ("terminate called
    # without an active exception": a joinable std::thread destroyed at teardown; the project has
    # none, torch's gloo worker threads do). Such an exit-time abort gets one more run; any
    # other failure, or a second one, fails the test.
    exit_abort = (
        proc.returncode != 0
        and "terminate called without an active exception" in proc.stderr
        and sorted(re.findall(expected, proc.stdout)) == ["0", "1"]
    )
    if exit_abort:
        proc = run_example()
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    found = re.findall(expected, proc.stdout)
    assert sorted(found) == ["0", "1"], proc.stdout
