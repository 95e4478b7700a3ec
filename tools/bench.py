#!/usr/bin/env python
"""Side-by-side training and attention benchmark of msa_xla on this host (a benchmark, not a test).

    python tools/bench.py                       # spec config, ~6-9 min on a 2-core CPU
    python tools/bench.py --json profiles/bench.json
    python tools/bench.py --quick               # tiny sizes, seconds (what tests/test_bench.py runs)

Sections (all in one process except the attention memory probes):
1. Matmul peak: a 2048^3 matmul in float32 and bfloat16, timed a few times; the best is the peak.
   Also the model's projection matmuls on their own under XLA (section 2's sizes; forward,
   input- and weight-gradient shapes) as a share of that peak: the yardstick for the step's MFU.
2. Training throughput, samples/s through `model.fit` after warm-up, float32, of
   (1) MSASeqLevelModel with jit_compile=True, (2) the same with jit_compile=False,
   (3) the stock tf_keras build of the same architecture (tools/baseline_model.py; equal parameter
   count asserted). Candidates are interleaved over several rounds (order rotated each round):
   on this shared machine identical runs drift between ~125 and ~195 samples/s for seconds at a
   time (docs/ARCHITECTURE.md §6), so we quote best-of-rounds, the median, and ratios of both.
   Model FLOPs per sample come from the config (matmuls x3 for forward + backward); MFU is
   against the measured float32 and bfloat16 peaks. The tracing count of `model.train_function`
   after warm-up and at the end shows whether any step recompiled.
3. Attention core forward + backward, `reference`, `fused`, `chunked` and the core of
   `tf_keras.layers.MultiHeadAttention` at several T: time, and the peak resident memory of a
   subprocess per candidate minus that of a subprocess that only imports TF and builds inputs
   (tools/bench_attention.py, which also runs on its own).
4. Input pipeline examples/s (tools/bench_input.py on the built-in dataset) beside samples/s.

Then a table, the targets of the performance issue (met or not, by how much; both in
tools/bench_report.py), and `--json OUT`.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
TOOLS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TOOLS_DIR)
sys.path[:0] = [TOOLS_DIR, REPO_DIR]  # run from a checkout; the other bench_* tools

from bench_attention import SPEC as ATTENTION_SPEC  # noqa: E402
from bench_attention import bench_attention  # noqa: E402
from bench_report import evaluate_targets, format_report  # noqa: E402

# The spec's training config (issue: B=32, T=50, 300/74/47, 4 heads, 2 encoder + 1 fusion layers).
SPEC = dict(batch_size=32, seq_len=50, text_dim=300, audio_dim=74, video_dim=47, num_heads=4,
            n_layers_mod=2, n_layers_fuse=1, dropout_rate=0.1)
SPEC_SIZES = ((128, 256), (256, 512))  # (model_dim, ff_dim); targets 1.5x and 1.3x
# Quick: no encoder blocks and one fusion layer, so the XLA compile of the step stays short.
QUICK = dict(batch_size=4, seq_len=8, text_dim=12, audio_dim=6, video_dim=5, num_heads=2,
             n_layers_mod=0, n_layers_fuse=1, dropout_rate=0.1)
QUICK_SIZES = ((16, 32),)
CANDIDATES = ("msa_xla_jit", "msa_xla_nojit", "keras_baseline")


# ---- host and peak -------------------------------------------------------------------------------
def host_info():
    import tensorflow as tf
    import tf_keras as keras

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in lines if line.startswith("flags"))
        isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    except (OSError, StopIteration):
        isa = []
    from msa_xla.runtime.allocator import cpu_allocator

    return {"cpu": cpu, "cpus": os.cpu_count(), "isa": isa, "python": platform.python_version(),
            "tensorflow": tf.__version__, "tf_keras": keras.__version__,
            "platform": platform.platform(), "cpu_allocator": cpu_allocator()}


def timed_calls(call, reps):
    """Seconds of `reps` calls of `call()` after one untimed warm-up call (tracing,
    compilation). `call` must block until its result exists (e.g. `.numpy()`)."""
    call()
    seconds = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return seconds


def gflops(flops, seconds):
    """Best and median GFLOP/s of timed runs of `flops` each."""
    # 3 decimals: --quick's small matmuls on a loaded host run below 0.05 GFLOP/s, which one
    # decimal rounded to 0.0.
    return {"best_gflops": round(flops / min(seconds) / 1e9, 3),
            "median_gflops": round(flops / statistics.median(seconds) / 1e9, 3)}


def matmul_peak(dtype_name, n, reps):
    """GFLOP/s of an n^3 matmul through TF (best and median of `reps` timed runs)."""
    import tensorflow as tf

    dtype = tf.as_dtype(dtype_name)
    a = tf.cast(tf.random.stateless_normal((n, n), seed=(1, 2)), dtype)
    b = tf.cast(tf.random.stateless_normal((n, n), seed=(3, 4)), dtype)
    matmul = tf.function(lambda x, y: tf.reduce_sum(tf.cast(tf.matmul(x, y)[:1, :1], tf.float32)))
    return {"n": n, **gflops(2 * n ** 3, timed_calls(lambda: matmul(a, b).numpy(), reps))}


def projection_matmul_rates(cfg, sizes, calls, reps):
    """GFLOP/s under XLA, float32, of the model's projection matmuls on their own.

    Every projection of a block (the fused QKV, the attention output, the two feed-forward
    ones) at each (model_dim, ff_dim), in the three shapes a training step runs it: forward
    (B*T, K) x (K, N), input gradient (B*T, N) x (N, K) and weight gradient (K, B*T) x (B*T, N).
    `calls` independent matmuls run in one compiled function (the step runs many side by side,
    and one alone would mostly time the call); best and median of `reps` timed calls. Per size,
    "all" is their total FLOPs over their total best time: how fast the step's projection
    matmuls (~90% of its FLOPs at T=50) run on their own here, the yardstick for its MFU. Not a
    strict ceiling: the d=128 step has measured a little above it.
    """
    import tensorflow as tf

    rows = cfg["batch_size"] * cfg["seq_len"]
    out = []
    for d, ff in sizes:
        flops_total = seconds_total = 0.0
        for name, k, n in (("qkv", d, 3 * d), ("attention output", d, d), ("ffn inner", d, ff),
                           ("ffn outer", ff, d)):
            for role, lhs, rhs, transpose_a in (("forward", (rows, k), (k, n), False),
                                                ("input gradient", (rows, n), (n, k), False),
                                                ("weight gradient", (rows, k), (rows, n), True)):
                a = tf.random.stateless_normal((calls,) + lhs, seed=(5, 6))
                b = tf.random.stateless_normal((calls,) + rhs, seed=(7, 8))
                matmuls = tf.function(
                    lambda a, b, t=transpose_a: [tf.matmul(a[i], b[i], transpose_a=t)
                                                 for i in range(calls)],
                    jit_compile=True)
                flops = 2 * rows * k * n * calls
                seconds = timed_calls(lambda f=matmuls, a=a, b=b: f(a, b)[-1].numpy(), reps)
                flops_total += flops
                seconds_total += min(seconds)
                out.append({"model_dim": d, "ff_dim": ff, "projection": name, "pass": role,
                            "shape": f"{'x'.join(map(str, lhs))} @ {'x'.join(map(str, rhs))}"
                                     + (" (lhs transposed)" if transpose_a else ""),
                            **gflops(flops, seconds)})
        out.append({"model_dim": d, "ff_dim": ff, "projection": "all", "pass": "all", "shape": "",
                    "best_gflops": round(flops_total / seconds_total / 1e9, 1),
                    "median_gflops": None})
    return out


def add_peak_share(rows, peak):
    """Each row's best GFLOP/s as a share of the float32 peak, in place."""
    for row in rows:
        row["best_of_peak_float32"] = round(row["best_gflops"] / peak["best_gflops"], 3)


# ---- FLOPs ---------------------------------------------------------------------------------------
def model_flops_per_sample(cfg, model_dim, ff_dim):
    """Matmul FLOPs (2*m*n*k) of one sample: projections, attention QK^T and PV, FFN.

    Element-wise work (softmax, norms, dropout) is not counted, as in MFU conventions.
    Returns forward FLOPs and training FLOPs (= 3x forward: backward is two matmuls per one).
    """
    d, ff = model_dim, ff_dim
    t = cfg["seq_len"]
    lens = {"text": t, "audio": t, "video": t}
    dims = {"text": cfg["text_dim"], "audio": cfg["audio_dim"], "video": cfg["video_dim"]}

    def block(tq, tk):
        q = 2 * tq * d * d
        kv = 2 * tk * d * 2 * d
        attention = 2 * tq * tk * d * 2  # QK^T and PV over all heads
        out = 2 * tq * d * d
        ffn = 2 * tq * d * ff * 2
        return q + kv + attention + out + ffn

    forward = 0
    for m in lens:
        forward += 2 * lens[m] * dims[m] * d  # input projection
        forward += cfg["n_layers_mod"] * block(lens[m], lens[m])
    forward += cfg["n_layers_fuse"] * (block(lens["text"], lens["audio"])
                                       + block(lens["text"], lens["video"]))
    forward += 2 * d  # Dense(1)
    return {"forward": forward, "train": 3 * forward}


# ---- training throughput -------------------------------------------------------------------------
def synthetic_dataset(cfg, num_batches, seed=0):
    """In-memory batches ((text, audio, video, masks...), label) with random true lengths.

    Held in memory and repeated, so the input pipeline costs nothing here (it is timed apart).
    """
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    n = cfg["batch_size"] * num_batches
    t = cfg["seq_len"]
    lengths = rng.integers(max(1, t // 2), t + 1, size=n)
    mask = np.arange(t)[None, :] < lengths[:, None]  # (N, T)
    features = [rng.standard_normal((n, t, cfg[k]), dtype=np.float32) * mask[..., None]
                for k in ("text_dim", "audio_dim", "video_dim")]
    labels = rng.uniform(-3, 3, size=(n, 1)).astype(np.float32)
    inputs = tuple(features) + (mask, mask, mask)
    return (tf.data.Dataset.from_tensor_slices((inputs, labels))
            .batch(cfg["batch_size"], drop_remainder=True).cache().repeat())


def build_candidates(cfg, model_dim, ff_dim):
    """{name: compiled model}; asserts that msa_xla and the baseline have equal parameter counts."""
    import tf_keras as keras
    from baseline_model import BaselineSeqLevelModel, example_inputs

    from msa_xla import MSASeqLevelModel

    arch = dict(seq_len=cfg["seq_len"], text_dim=cfg["text_dim"], audio_dim=cfg["audio_dim"],
                video_dim=cfg["video_dim"], model_dim=model_dim, num_heads=cfg["num_heads"],
                ff_dim=ff_dim, n_layers_mod=cfg["n_layers_mod"],
                n_layers_fuse=cfg["n_layers_fuse"], dropout_rate=cfg["dropout_rate"])
    models = {}
    for name in CANDIDATES:
        keras.utils.set_random_seed(0)
        if name == "keras_baseline":
            model = BaselineSeqLevelModel(**arch)
            model(example_inputs(model, 2))
        else:
            model = MSASeqLevelModel(**arch)
            model(model.example_inputs(2))
        model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="mae",
                      jit_compile=(name == "msa_xla_jit"))
        models[name] = model
    counts = {name: int(m.count_params()) for name, m in models.items()}
    assert len(set(counts.values())) == 1, f"parameter counts differ: {counts}"
    return models, counts["msa_xla_jit"]


class _StepTimer:
    """Keras callback recording the wall time at the end of every train batch."""

    def __new__(cls):
        import tf_keras as keras

        class StepTimer(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.ends = []

            def on_train_batch_end(self, batch, logs=None):
                self.ends.append(time.perf_counter())

        return StepTimer()


def tracing_count(model):
    fn = getattr(model, "train_function", None)
    getter = getattr(fn, "experimental_get_tracing_count", None)
    return int(getter()) if getter else None


def time_training(models, dataset, batch_size, rounds, steps, warmup_steps):
    """Interleaved rounds of `model.fit`; samples/s over steps 2..N of each fit (fit's set-up,
    the first step's dispatch and the epoch-end work are outside the window)."""
    timer = _StepTimer()
    results = {name: {"samples_per_s": []} for name in models}
    for name, model in models.items():  # warm-up: trace, compile, first steps
        start = time.perf_counter()
        model.fit(dataset, epochs=1, steps_per_epoch=warmup_steps, verbose=0)
        results[name]["warmup_seconds"] = round(time.perf_counter() - start, 2)
        results[name]["tracing_count_after_warmup"] = tracing_count(model)
    names = list(models)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        for name in order:
            models[name].fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0,
                             callbacks=[timer])
            elapsed = timer.ends[-1] - timer.ends[0]
            results[name]["samples_per_s"].append((len(timer.ends) - 1) * batch_size / elapsed)
    for name, res in results.items():
        rates = res["samples_per_s"]
        res["samples_per_s"] = [round(x, 1) for x in rates]
        res["best_samples_per_s"] = round(max(rates), 1)
        res["median_samples_per_s"] = round(statistics.median(rates), 1)
        res["tracing_count_end"] = tracing_count(models[name])
        res["recompiled_after_warmup"] = (res["tracing_count_end"]
                                          != res["tracing_count_after_warmup"])
    return results


def add_mfu(training_runs, peaks):
    """MFU of every candidate against the final (highest) measured matmul peaks, in place."""
    for run in training_runs:
        for res in run["candidates"].values():
            for stat in ("best", "median"):
                for dtype, peak in peaks.items():
                    res[f"{stat}_mfu_{dtype}"] = round(
                        res[f"{stat}_gflops"] / peak["best_gflops"], 3)


def bench_training(cfg, sizes, rounds, steps, warmup_steps):
    runs = []
    dataset = synthetic_dataset(cfg, num_batches=8)
    for model_dim, ff_dim in sizes:
        steps_here = steps if model_dim <= 128 else max(4, steps * 2 // 3)
        models, params = build_candidates(cfg, model_dim, ff_dim)
        results = time_training(models, dataset, cfg["batch_size"], rounds, steps_here,
                                warmup_steps)
        flops = model_flops_per_sample(cfg, model_dim, ff_dim)
        for res in results.values():
            for stat in ("best", "median"):
                achieved = res[f"{stat}_samples_per_s"] * flops["train"] / 1e9
                res[f"{stat}_gflops"] = round(achieved, 1)
        ratios = {}
        for num, den in (("msa_xla_jit", "keras_baseline"), ("msa_xla_jit", "msa_xla_nojit"),
                         ("msa_xla_nojit", "keras_baseline")):
            ratios[f"{num}/{den}"] = {
                stat: round(results[num][f"{stat}_samples_per_s"]
                            / results[den][f"{stat}_samples_per_s"], 3)
                for stat in ("best", "median")}
            # Per-round ratios: both ran in the same round, so they share the machine's state.
            per_round = [a / b for a, b in zip(results[num]["samples_per_s"],
                                               results[den]["samples_per_s"])]
            ratios[f"{num}/{den}"]["median_of_rounds"] = round(statistics.median(per_round), 3)
        runs.append({"model_dim": model_dim, "ff_dim": ff_dim, "params": params,
                     "steps_per_round": steps_here, "rounds": rounds,
                     "flops_per_sample": flops, "candidates": results, "ratios": ratios})
        del models
        import tf_keras as keras
        keras.backend.clear_session()
    return runs


# ---- input pipeline ------------------------------------------------------------------------------
def bench_input(batch_size, num_batches, rounds):
    from bench_input import measure_input_throughput

    from msa_xla.data import ensure_builtin_dataset

    return measure_input_throughput(ensure_builtin_dataset(), batch_size, num_batches, rounds)


# ---- main ----------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds (for tests)")
    parser.add_argument("--json", help="write the full result as JSON here")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5; quick 2)")
    parser.add_argument("--steps", type=int, help="timed steps per fit (default 30; quick 4)")
    parser.add_argument("--sizes", help="model_dim:ff_dim pairs, e.g. 128:256,256:512")
    parser.add_argument("--attention_seq_lens", help="e.g. 50,500,2048")
    parser.add_argument("--no_attention_jit", action="store_true",
                        help="time the attention cores in graph mode instead of under XLA")
    args = parser.parse_args(argv)

    quick = args.quick
    cfg = dict(QUICK if quick else SPEC)
    sizes = (tuple(tuple(int(x) for x in p.split(":")) for p in args.sizes.split(","))
             if args.sizes else (QUICK_SIZES if quick else SPEC_SIZES))
    rounds = args.rounds or (1 if quick else 4)
    steps = args.steps or (3 if quick else 20)
    warmup_steps = 2 if quick else 5
    peak_n, peak_reps = (256, 2) if quick else (2048, 4)
    attention_spec = (dict(batch=2, heads=2, head_dim=8, iters=2, iters_long=2) if quick
                      else ATTENTION_SPEC)
    seq_lens = (tuple(int(x) for x in args.attention_seq_lens.split(","))
                if args.attention_seq_lens else ((16,) if quick else (50, 500, 2048)))
    attention_jit = not args.no_attention_jit
    started = time.perf_counter()

    import tensorflow as tf  # noqa: F401  (after the env var)

    result = {"load_average_start": [round(x, 2) for x in os.getloadavg()],
              "command": "python tools/bench.py " + " ".join(sys.argv[1:] if argv is None
                                                              else argv),
              "host": host_info(), "config": cfg, "quick": quick,
              "settings": {"rounds": rounds, "steps": steps, "warmup_steps": warmup_steps,
                           "peak_reps": peak_reps}}
    sections = result["section_seconds"] = {}
    mark = time.perf_counter()

    def lap(name):
        nonlocal mark
        sections[name] = round(time.perf_counter() - mark, 1)
        mark = time.perf_counter()

    print("matmul peak ...", flush=True)
    peaks = {d: matmul_peak(d, peak_n, peak_reps) for d in ("float32", "bfloat16")}
    result["matmul_peak"] = peaks
    lap("matmul_peak")
    print("training ...", flush=True)
    result["training"] = bench_training(cfg, sizes, rounds, steps, warmup_steps)
    # Peak again after training: the machine's state drifts; keep the higher (the capability).
    for d in peaks:
        again = matmul_peak(d, peak_n, peak_reps)
        if again["best_gflops"] > peaks[d]["best_gflops"]:
            peaks[d] = again
    add_mfu(result["training"], peaks)  # against the peak the report prints
    lap("training")
    print("projection matmuls ...", flush=True)
    result["projection_matmuls"] = projection_matmul_rates(cfg, sizes, 2 if quick else 8,
                                                           2 if quick else 15)
    add_peak_share(result["projection_matmuls"], peaks["float32"])
    lap("projection_matmuls")
    print("input pipeline ...", flush=True)
    result["input_pipeline"] = bench_input(cfg["batch_size"], 5 if quick else 100,
                                           1 if quick else 3)
    best_train = max(c["best_samples_per_s"] for run in result["training"]
                     for c in run["candidates"].values())
    result["input_vs_training"] = round(
        result["input_pipeline"]["median_examples_per_s"] / best_train, 1)
    lap("input_pipeline")
    print("attention ...", flush=True)
    result["attention"] = {**attention_spec, "jit": attention_jit, "seq_lens": list(seq_lens),
                           "rows": bench_attention(attention_spec, seq_lens, attention_jit,
                                                   one_process=quick)}
    lap("attention")
    result["targets"] = evaluate_targets(result)
    result["elapsed_seconds"] = round(time.perf_counter() - started, 1)
    result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    report = format_report(result)
    result["report"] = report
    print()
    print(report)
    print(f"\n({result['elapsed_seconds']:.0f} s)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
