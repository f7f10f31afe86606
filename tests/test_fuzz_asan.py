"""The core's CPU backend under AddressSanitizer + UndefinedBehaviorSanitizer (issue 8).

A separate CMake build (tests/asan/CMakeLists.txt, into build/asan; no Python, no pybind11) of
csrc/core and csrc/kernels/cpu with -fsanitize=address,undefined, linked with tests/asan/driver.cc:
ranks as threads, random sizes for every op of both modes (FP8 included), static sizes with
overflow, several rounds per op, bad inputs and a handle that does not fit on one rank (every rank
must raise); results checked exactly. Any out-of-bounds access, use after free, leak or undefined
behaviour aborts the driver with the sanitizer's report. ~30 s on 2 cores (mostly the build; a
second run only rebuilds what changed). FUSED_A2A_ASAN_ITERS sets the iteration count.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
BUILD_DIR = os.path.join(REPO_ROOT, "build", "asan")
ITERATIONS = int(os.environ.get("FUSED_A2A_ASAN_ITERS", "3000"))


def _run(cmd, timeout, env=None):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def driver() -> str:
    os.makedirs(os.path.join(REPO_ROOT, "build"), exist_ok=True)
    cmake = shutil.which("cmake")
    if cmake is None or shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("needs cmake and a C++ compiler")
    probe = subprocess.run(
        [
            os.environ.get("CXX", "c++"),
            "-fsanitize=address,undefined",
            "-x",
            "c++",
            "-",
            "-o",
            os.path.join(REPO_ROOT, "build", "asan_probe"),
        ],
        input="int main() { return 0; }\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    if os.path.exists(os.path.join(REPO_ROOT, "build", "asan_probe")):
        os.remove(os.path.join(REPO_ROOT, "build", "asan_probe"))
    if probe.returncode != 0:
        pytest.skip(f"the C++ compiler cannot build with the sanitizers: {probe.stderr[-500:]}")
    configure = _run([cmake, "-S", os.path.join(TESTS_DIR, "asan"), "-B", BUILD_DIR], 300)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    build = _run([cmake, "--build", BUILD_DIR, "-j", str(max(2, os.cpu_count() or 2))], 900)
    assert build.returncode == 0, (build.stdout + build.stderr)[-6000:]
    return os.path.join(BUILD_DIR, "fa2a_asan_driver")


def _sanitized_run(driver, *args):
    env = dict(os.environ)
    env["ASAN_OPTIONS"] = "detect_leaks=1:abort_on_error=0:halt_on_error=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    env.pop("LD_PRELOAD", None)
    proc = _run([driver, *args], 600, env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "OK" in proc.stdout, out[-8000:]
    print(f"\nASan/UBSan driver: {proc.stdout.strip()}")


def test_core_under_asan_and_ubsan(driver):
    _sanitized_run(driver, str(ITERATIONS), "1")


def test_corrupt_handles_under_asan_and_ubsan(driver):
    """Normal-mode handles corrupted on one rank: every rank raises (the status of round 0), none
    writes out of bounds or waits for a timeout."""
    _sanitized_run(driver, "40", "3", "corrupt")
