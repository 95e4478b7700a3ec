"""Would batching the three modality encoders speed up the XLA step? An upper bound, measured.

Times forward + backward under XLA of (a) three ModalityEncoders on their own batches, as the
models run them, and (b) one ModalityEncoder on the three batches stacked: the same FLOPs as
a batched computation with stacked weights, in fewer and larger ops. If (b) is not faster
than (a), stacking the encoders' weights cannot pay on this host.

    python tools/bench_encoders.py            # spec sizes: B=32, T=50, d=128, ff 256, 2 layers
    python tools/bench_encoders.py --quick    # tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _step_functions(batch, seq_len, model_dim, ff_dim, layers, heads):
    import tensorflow as tf

    from msa_xla import ModalityEncoder

    def encoder():
        return ModalityEncoder(model_dim, heads, ff_dim, layers, seq_len, dropout_rate=0.1)

    separate, stacked = [encoder() for _ in range(3)], encoder()
    inputs = [tf.random.stateless_normal([batch, seq_len, model_dim], seed=[i, 0])
              for i in range(3)]
    stacked_inputs = tf.concat(inputs, axis=0)

    def three_encoders():
        with tf.GradientTape() as tape:
            loss = tf.add_n([tf.reduce_sum(enc(x, training=True))
                             for enc, x in zip(separate, inputs)])
        return tape.gradient(loss, [v for enc in separate for v in enc.trainable_variables])

    def one_stacked_encoder():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(stacked(stacked_inputs, training=True))
        return tape.gradient(loss, stacked.trainable_variables)

    return {"three_encoders": tf.function(three_encoders, jit_compile=True),
            "one_encoder_3x_batch": tf.function(one_stacked_encoder, jit_compile=True)}


def run(batch, seq_len, model_dim, ff_dim, layers, heads, rounds, iters):
    """{candidate: {'median_ms', 'best_ms'}} over interleaved rounds of `iters` calls."""
    functions = _step_functions(batch, seq_len, model_dim, ff_dim, layers, heads)
    for fn in functions.values():  # compile and warm up
        for _ in range(2):
            fn()[0].numpy()
    times = {name: [] for name in functions}
    for _ in range(rounds):
        for name, fn in functions.items():
            start = time.perf_counter()
            for _ in range(iters):
                grads = fn()
            grads[0].numpy()
            times[name].append((time.perf_counter() - start) / iters * 1000)
    return {name: {"median_ms": round(statistics.median(t), 2), "best_ms": round(min(t), 2)}
            for name, t in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (for tests)")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    sizes = (dict(batch=4, seq_len=8, model_dim=16, ff_dim=32, layers=1, heads=2) if args.quick
             else dict(batch=32, seq_len=50, model_dim=128, ff_dim=256, layers=2, heads=4))
    result = run(**sizes, rounds=2 if args.quick else args.rounds, iters=2 if args.quick else 10)
    print(f"forward+backward under XLA, {sizes}")
    for name, res in result.items():
        print(f"  {name:22s} median {res['median_ms']:8.2f} ms   best {res['best_ms']:8.2f} ms")
    ratio = result["three_encoders"]["median_ms"] / result["one_encoder_3x_batch"]["median_ms"]
    print(f"  three / stacked (median): {ratio:.2f}  (> 1: batching the encoders would pay)")
    return result


if __name__ == "__main__":
    main()
