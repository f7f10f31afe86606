"""benchmarks/bench_normal.py's case environment: each case runs with the knobs the bench started
with plus its own, never with an earlier case's (sessions 7-8 lost A/Bs to leaked knobs)."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_bench(monkeypatch):
    monkeypatch.setenv("FUSED_A2A_CUDA_TRACE", "1")  # set before the bench starts: kept
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))  # its helper module
    spec = importlib.util.spec_from_file_location(
        "bench_normal_under_test", os.path.join(ROOT, "benchmarks", "bench_normal.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_case_knobs_do_not_leak(monkeypatch):
    bench = _load_bench(monkeypatch)
    for key in list(os.environ):
        if key.startswith("FUSED_A2A_CUDA_") and key != "FUSED_A2A_CUDA_TRACE":
            monkeypatch.delenv(key)
    bench._set_case_env(bench.CASES["standard_dealt"]["env"])
    assert os.environ["FUSED_A2A_CUDA_CLAIM"] == "0"
    bench._set_case_env(bench.CASES["standard_cclaim"]["env"])
    assert "FUSED_A2A_CUDA_CLAIM" not in os.environ
    assert os.environ["FUSED_A2A_CUDA_COMBINE_CLAIM"] == "1"
    bench._set_case_env({})
    knobs = {k: v for k, v in os.environ.items() if k.startswith("FUSED_A2A_CUDA_")}
    assert knobs == {"FUSED_A2A_CUDA_TRACE": "1"}
