"""Time to the first train step: tracing and XLA-compiling one train step, per optimizer update.

Before its first step a run traces its train step (forward, backward, optimizer update) into a
graph and XLA compiles it; with tf_keras' Adam the update alone is ~30 ops per variable. This
times both phases of one jit-compiled train step (forward, L1 loss, backward, Adam update)
under tf_keras' Adam and under the trainer's FusedAdam (msa_xla/trainer/optimizer.py), in one
process, alternating, each on a fresh model and a fresh tf.function: medians over rounds.

    python tools/bench_trace.py            # seqlevel (bench.py's spec) and MulT (MMSA's MOSI)
    python tools/bench_trace.py --quick    # tiny models, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)),  # the other bench tools
                os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

from bench import SPEC, SPEC_SIZES, host_info  # noqa: E402

from msa_xla.data.synthetic import MOSI_DIMS  # noqa: E402  (300, 74, 47)

# name -> (model, kwargs): tools/bench.py's spec config at its first size, and MulT at MMSA's
# MOSI regression config.
SPEC_MODEL = {k: v for k, v in SPEC.items() if k != "batch_size"}
FULL = {"seqlevel": ("seqlevel", dict(SPEC_MODEL, model_dim=SPEC_SIZES[0][0],
                                      ff_dim=SPEC_SIZES[0][1])),
        "mult": ("mult", dict(zip(("text_dim", "audio_dim", "video_dim"), MOSI_DIMS),
                              seq_len=50))}
QUICK = {"seqlevel": ("seqlevel", dict(seq_len=8, text_dim=6, audio_dim=5, video_dim=4,
                                       model_dim=16, num_heads=2, ff_dim=32, n_layers_mod=1,
                                       n_layers_fuse=1)),
         "mult": ("mult", dict(seq_len=8, text_dim=6, audio_dim=5, video_dim=4, model_dim=16,
                               num_heads=2, n_levels=1))}


def _optimizers():
    import tf_keras as keras

    from msa_xla.trainer.optimizer import FusedAdam

    return {"keras_adam": keras.optimizers.Adam, "fused_adam": FusedAdam}


def time_first_step(model_name, kwargs, optimizer_class, batch):
    """(trace seconds, first call seconds: XLA compile + one step, variable count)."""
    import tensorflow as tf
    import tf_keras as keras

    from msa_xla.models import MODELS

    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    model = MODELS[model_name](**kwargs)
    inputs = model.example_inputs(batch)
    model(inputs, training=False)
    optimizer = optimizer_class(1e-3)
    optimizer.build(model.trainable_variables)
    labels = tf.zeros([batch, 1])

    @tf.function(jit_compile=True)
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.abs(model(x, training=True) - labels))
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    start = time.perf_counter()
    step.get_concrete_function(inputs)
    traced = time.perf_counter()
    step(inputs).numpy()
    return traced - start, time.perf_counter() - traced, len(model.trainable_variables)


def run(models, rounds, batch):
    results = {}
    optimizers = _optimizers()
    for name, (model_name, kwargs) in models.items():
        times = {opt: {"trace_s": [], "first_call_s": []} for opt in optimizers}
        for r in range(rounds):
            order = list(optimizers)[r % 2:] + list(optimizers)[:r % 2]  # alternate who is first
            for opt in order:
                trace, call, variables = time_first_step(model_name, kwargs, optimizers[opt], batch)
                times[opt]["trace_s"].append(trace)
                times[opt]["first_call_s"].append(call)
                print(f"  {name} round {r + 1}/{rounds} {opt}: trace {trace:.2f} s, first call "
                      f"{call:.2f} s", flush=True)
        results[name] = {"variables": variables, **{
            opt: {k: statistics.median(v) for k, v in t.items()} for opt, t in times.items()}}
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, seconds")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (3; quick 1)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--json", help="write the result as JSON here")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    if rounds < 1 or args.batch < 1:
        parser.error("--rounds and --batch must be >= 1")
    results = run(QUICK if args.quick else FULL, rounds, args.batch)
    cpu = host_info()["cpu"]
    print(f"\nTime to the first train step (medians of {rounds}; {cpu}, {os.cpu_count()} cores)")
    print(f"{'model':10} {'variables':>9} {'optimizer':>11} {'trace s':>8} {'first call s':>13}")
    for name, r in results.items():
        for opt in _optimizers():
            print(f"{name:10} {r['variables']:>9} {opt:>11} {r[opt]['trace_s']:>8.2f} "
                  f"{r[opt]['first_call_s']:>13.2f}")
        total = {opt: r[opt]["trace_s"] + r[opt]["first_call_s"] for opt in _optimizers()}
        print(f"{name:10} trace + first call: keras_adam / fused_adam = "
              f"{total['keras_adam'] / total['fused_adam']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu, "rounds": rounds, "batch": args.batch, "results": results}, f,
                      indent=2)


if __name__ == "__main__":
    main()
