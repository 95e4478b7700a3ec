#!/usr/bin/env python
"""Input throughput of msa_xla.data.make_dataset on this host (examples/s), a benchmark, not a test.

    python tools/bench_input.py                          # built-in dataset, batch 32
    python tools/bench_input.py --data_dir tfrecords/mosi_unaligned --json profiles/input.json

It iterates the training pipeline (shuffle + repeat, as the trainer uses it) for `--num_batches`
batches after a warm-up, over several rounds, and reports the median and the best round: on a shared
machine absolute rates drift (docs/ARCHITECTURE.md §6), so the best round is the capability and the median the
typical. The input pipeline must outrun the model by a wide margin (>= 20x the training rate) so it
never bounds a step; `--model_rate` (default: ~190 samples/s, the spec's model on this 2-core CPU,
docs/ARCHITECTURE.md §3) sets the yardstick, and the ratio is printed.

`measure_input_throughput` is importable (tools/bench.py uses it).
"""
import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Run from a checkout.

DEFAULT_MODEL_RATE = 190.0  # samples/s: docs/ARCHITECTURE.md §3, stock MSASeqLevelModel B=32, 2 cores
REQUIRED_RATIO = 20.0


def measure_input_throughput(data_dir, batch_size=32, num_batches=200, rounds=5, *, warmup=20,
                             split="train", text_input="features", seed=0):
    """Time `rounds` passes of `num_batches` batches; returns a dict of examples/s figures.

    The dataset is built once and iterated continuously (repeat=True) as in training; the first
    `warmup` batches fill the prefetch buffers and the shuffle buffer and are not timed.
    """
    import tensorflow as tf

    from msa_xla.data import load_metadata, make_dataset

    meta = load_metadata(data_dir)
    dataset = make_dataset(data_dir, split, batch_size, repeat=True, seed=seed,
                           text_input=text_input)
    iterator = iter(dataset)
    start = time.perf_counter()
    for _ in range(warmup):
        next(iterator)
    warmup_s = time.perf_counter() - start
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(num_batches):
            inputs, label = next(iterator)
        # Touch the last batch so the timing includes its production, not just a handle.
        tf.debugging.assert_all_finite(label, "label")
        rates.append(num_batches * batch_size / (time.perf_counter() - start))
    record_floats = sum(v["seq_len"] * v["dim"] for v in meta["modalities"].values())
    median = statistics.median(rates)
    return {
        "data_dir": os.path.abspath(data_dir), "split": split, "batch_size": batch_size,
        "num_batches": num_batches, "rounds": rounds, "text_input": text_input,
        "record_floats": record_floats, "warmup_seconds": round(warmup_s, 3),
        "examples_per_s": [round(r, 1) for r in rates],
        "median_examples_per_s": round(median, 1), "best_examples_per_s": round(max(rates), 1),
        "median_mb_per_s": round(median * record_floats * 4 / 1e6, 1),
        "host_cpus": os.cpu_count(),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", help="dataset folder (default: the built-in dataset)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_batches", type=int, default=200, help="timed batches per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=20, help="untimed batches first")
    parser.add_argument("--text_input", choices=("features", "tokens"), default="features")
    parser.add_argument("--model_rate", type=float, default=DEFAULT_MODEL_RATE,
                        help="training samples/s of the model the input must outrun")
    parser.add_argument("--json", help="write the result as JSON here")
    args = parser.parse_args(argv)

    from msa_xla.data import ensure_builtin_dataset

    data_dir = args.data_dir or ensure_builtin_dataset()
    result = measure_input_throughput(data_dir, args.batch_size, args.num_batches, args.rounds,
                                      warmup=args.warmup, text_input=args.text_input)
    result["model_rate"] = args.model_rate
    result["ratio_to_model_median"] = round(result["median_examples_per_s"] / args.model_rate, 1)
    result["ok"] = result["ratio_to_model_median"] >= REQUIRED_RATIO
    print(f"make_dataset {data_dir} split=train batch={args.batch_size}: "
          f"median {result['median_examples_per_s']:.0f} examples/s, best "
          f"{result['best_examples_per_s']:.0f} ({result['median_mb_per_s']:.0f} MB/s median) over "
          f"{args.rounds} rounds x {args.num_batches} batches")
    print(f"  = {result['ratio_to_model_median']:.1f}x the model's {args.model_rate:.0f} samples/s "
          f"(need >= {REQUIRED_RATIO:.0f}x): {'OK' if result['ok'] else 'TOO SLOW'}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
