"""Host-side checks of CUDA kernel logic (no GPU needed, nvcc needed): programs under
tests/cuda_host/ include the kernels' headers, are built for the host with nvcc and print "ok".

- rect_items_check.cu: the dispatch and combine kernels' item deal (rect_item) visits every item
  of a round once, each warp the round-robin share of the chunk- or column-major order.
- own_rows_check.cu: who copies the dispatch's own rows (senders, receivers, or split chunk by
  chunk): every own chunk by exactly one role.
- recv_slices_check.cu: the dispatch receivers' row slices of a chunk (FUSED_A2A_CUDA_RECV_ROWS)
  cover every row of a stream exactly once, each inside its chunk.
- layout_notify_check.cu: a sender's view of a receiver's placement of its rows (the static
  dispatch's default since session 11; FUSED_A2A_CUDA_LAYOUT=ready waits for the receiver's
  message instead) equals the receiver's own and a row-by-row placement, including the recv_x
  row where the direct rows (session 19) write a sender's first row.
- scan_pack_check.cu: the route scan's second pass with four destinations a scan (16-bit fields
  of one word; session 24) gives every destination's cum and send list, over tiles and steps.

Also: benchmarks/link_probe.cu (the link-ceiling probe of tools/gpu_check.sh) still compiles
against the kernel headers (a header change broke it once, unnoticed until a GPU run).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for candidate in ("/usr/local/cuda/bin/nvcc",):
        if os.path.exists(candidate):
            return candidate
    return None


def _build(source, exe):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("needs nvcc (the CUDA toolkit); the CUDA backend is not built without it")
    build = subprocess.run(
        [
            nvcc, "-std=c++17", "--expt-relaxed-constexpr", "-O2",
            "-gencode=arch=compute_90a,code=sm_90a",
            "-I", os.path.join(ROOT, "csrc", "include"), "-I", os.path.join(ROOT, "csrc"),
            "-I", os.path.join(ROOT, "csrc", "kernels", "cuda"), source, "-o", str(exe),
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr


@pytest.mark.parametrize(
    "program",
    [
        "rect_items_check",
        "own_rows_check",
        "recv_slices_check",
        "layout_notify_check",
        "scan_pack_check",
    ],
)
def test_cuda_host_program(program, tmp_path):
    exe = tmp_path / program
    _build(os.path.join(HERE, "cuda_host", program + ".cu"), exe)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stdout + run.stderr


def test_link_probe_compiles(tmp_path):
    _build(os.path.join(ROOT, "benchmarks", "link_probe.cu"), tmp_path / "link_probe")
