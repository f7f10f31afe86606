"""The device-time tools that run without a GPU: tools/source_hash.sh, whose hash decides whether
tools/gpu_check.sh installs the module tools/prebuild.sh made (.prebuilt/) or compiles. It must
follow what the module is built from (csrc/, CMakeLists.txt, the CUDA arch) and nothing else, and
read the same in any copy of the tree (the GPU machine's has no usable git)."""

from __future__ import annotations

import os
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hash(tree: str, **env) -> str:
    out = subprocess.run(
        ["bash", os.path.join(tree, "tools", "source_hash.sh")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
        check=True,
    )
    return out.stdout.strip()


def test_source_hash_follows_the_module_sources_only(tmp_path):
    tree = str(tmp_path / "tree")
    for part in ("csrc", "tools"):
        shutil.copytree(os.path.join(ROOT, part), os.path.join(tree, part))
    shutil.copy(os.path.join(ROOT, "CMakeLists.txt"), tree)
    base = _hash(tree)
    assert len(base) == 64 and base == _hash(ROOT) == _hash(tree)  # any copy, every time
    with open(os.path.join(tree, "tools", "unrelated.txt"), "w") as f:
        f.write("not a source of the module")
    assert _hash(tree) == base
    assert _hash(tree, FUSED_A2A_CUDA_ARCH="100a") != base
    with open(os.path.join(tree, "CMakeLists.txt"), "a") as f:
        f.write("\n")
    changed_cmake = _hash(tree)
    assert changed_cmake != base
    with open(os.path.join(tree, "csrc", "core", "arena.cc"), "a") as f:
        f.write("// one more line\n")
    assert _hash(tree) not in (base, changed_cmake)
