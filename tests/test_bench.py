"""tools/bench.py runs end to end at tiny sizes and its JSON holds every field (speed is never
asserted: that is the benchmark's job, not a test's)."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TOP_LEVEL = ("command", "host", "config", "quick", "settings", "matmul_peak",
             "projection_matmuls", "training",
             "input_pipeline", "input_vs_training", "attention", "targets", "report",
             "elapsed_seconds", "section_seconds", "load_average_start", "load_average_end")
CANDIDATE = ("samples_per_s", "best_samples_per_s", "median_samples_per_s", "warmup_seconds",
             "tracing_count_after_warmup", "tracing_count_end", "recompiled_after_warmup",
             "best_gflops", "median_gflops", "best_mfu_float32", "best_mfu_bfloat16",
             "median_mfu_float32", "median_mfu_bfloat16")
RATIOS = ("msa_xla_jit/keras_baseline", "msa_xla_jit/msa_xla_nojit",
          "msa_xla_nojit/keras_baseline")
ATTENTION_ROW = ("impl", "seq_len", "best_ms", "median_ms", "peak_rss_mb", "baseline_rss_mb",
                 "peak_mb_over_baseline")


@pytest.mark.slow
def test_quick_benchmark_writes_every_field(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "MSA_XLA_DATA_HOME": str(tmp_path / "data")}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "bench.py"), "--quick",
                           "--json", str(out)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in TOP_LEVEL:
        assert key in result, key
    for dtype in ("float32", "bfloat16"):
        assert result["matmul_peak"][dtype]["best_gflops"] > 0
    projections = result["projection_matmuls"]
    assert len(projections) == 4 * 3 + 1 and projections[-1]["projection"] == "all"
    for row in projections[:-1]:
        assert 0 < row["median_gflops"] <= row["best_gflops"]
    for row in projections:
        assert row["best_of_peak_float32"] == round(
            row["best_gflops"] / result["matmul_peak"]["float32"]["best_gflops"], 3)
    # "all" is total FLOPs over total time: between the slowest and the fastest shape.
    rates = [row["best_gflops"] for row in projections[:-1]]
    assert min(rates) - 0.1 <= projections[-1]["best_gflops"] <= max(rates) + 0.1
    (run,) = result["training"]
    assert run["flops_per_sample"]["train"] == 3 * run["flops_per_sample"]["forward"] > 0
    assert run["params"] > 0
    for name in ("msa_xla_jit", "msa_xla_nojit", "keras_baseline"):
        for key in CANDIDATE:
            assert key in run["candidates"][name], (name, key)
    for ratio in RATIOS:
        assert set(run["ratios"][ratio]) == {"best", "median", "median_of_rounds"}
    impls = {row["impl"] for row in result["attention"]["rows"]}
    assert impls == {"reference", "fused", "chunked", "keras_mha"}
    for row in result["attention"]["rows"]:
        for key in ATTENTION_ROW:
            assert key in row, (row.get("impl"), key)
    assert result["input_pipeline"]["median_examples_per_s"] > 0
    assert all("met" in t for t in result["targets"])
    assert "MSASeqLevelModel jit" in result["report"] and "Targets" in proc.stdout


def test_encoder_batching_benchmark_runs_and_reports_both_candidates():
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import bench_encoders
    finally:
        sys.path.remove(os.path.join(REPO, "tools"))
    result = bench_encoders.main(["--quick"])
    assert set(result) == {"three_encoders", "one_encoder_3x_batch"}
    for res in result.values():
        assert 0 < res["best_ms"] <= res["median_ms"]


def test_mfu_is_against_the_final_peak():
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import bench
    finally:
        sys.path.remove(os.path.join(REPO, "tools"))
    runs = [{"candidates": {"a": {"best_gflops": 114.1, "median_gflops": 100.0}}}]
    bench.add_mfu(runs, {"float32": {"best_gflops": 220.4}, "bfloat16": {"best_gflops": 415.6}})
    res = runs[0]["candidates"]["a"]
    assert res["best_mfu_float32"] == round(114.1 / 220.4, 3)
    assert res["median_mfu_bfloat16"] == round(100.0 / 415.6, 3)


def test_baseline_target_states_the_mfu_it_needs_and_what_the_matmuls_reach():
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import bench_report
    finally:
        sys.path.remove(os.path.join(REPO, "tools"))
    ratio = {"best": 1.36, "median": 1.48, "median_of_rounds": 1.43}
    result = {
        "training": [{"model_dim": 128, "ratios": {"msa_xla_jit/keras_baseline": ratio,
                                                   "msa_xla_jit/msa_xla_nojit": ratio},
                      "candidates": {"keras_baseline": {"best_mfu_float32": 0.446,
                                                        "recompiled_after_warmup": False}}}],
        "projection_matmuls": [
            {"model_dim": 128, "pass": "forward", "best_of_peak_float32": 0.69},
            {"model_dim": 128, "pass": "all", "best_of_peak_float32": 0.64}],
        "attention": {"rows": [], "seq_lens": [50]}}
    target = bench_report.evaluate_targets(result)[0]
    assert target["target"] == "d=128: jit >= 1.5x keras baseline" and not target["met"]
    assert target["needed_mfu_float32"] == 0.669  # 1.5 x the baseline's 44.6%
    assert target["projection_matmuls_of_peak_float32"] == 0.64  # the "all" row, not one shape
