#!/usr/bin/env python
"""Attention core benchmark: forward + backward time and the peak memory of a process each.

    python tools/bench_attention.py                      # T = 50, 500, 2048 under XLA
    python tools/bench_attention.py --seq_lens 50,500 --no_jit

The cores are msa_xla's `reference`, `fused` and `chunked` and the core of
`tf_keras.layers.MultiHeadAttention` after its projections. Each (impl, T) runs in a fresh
subprocess (`--worker`, internal), so its peak resident memory is its own; a subprocess that
only imports TF and builds the inputs (impl 'none') is the baseline subtracted from it.
tools/bench.py runs this as its attention section.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_DIR)  # run from a checkout

from msa_xla.options import ATTENTION_IMPLS  # noqa: E402  (TF-free)

CANDIDATES = ATTENTION_IMPLS + ("keras_mha",)  # the kernel's implementations and stock keras
SPEC = dict(batch=4, heads=4, head_dim=32, iters=10, iters_long=3)


# ---- one attention core, in its own process ------------------------------------------------------
def attention_worker(impl, seq_len, batch, heads, head_dim, iters, jit):
    """Runs in its own process: times forward + backward of one attention core; prints JSON.

    impl 'none' only imports TF and builds the inputs (the memory baseline).
    """
    import tensorflow as tf

    shape = (batch, seq_len, heads, head_dim)  # (B, T, H, Dh)
    q, k, v = (tf.random.stateless_normal(shape, seed=(i, 0)) for i in range(3))
    lengths = seq_len - tf.range(batch) * (seq_len // (4 * batch))  # some padding per row
    mask = tf.sequence_mask(lengths, seq_len)  # (B, T)
    rss_inputs = _current_rss_mb()
    result = {"impl": impl, "seq_len": seq_len, "batch": batch, "heads": heads,
              "head_dim": head_dim, "jit": jit}
    if impl != "none":
        if impl == "keras_mha":
            import tf_keras as keras

            layer = keras.layers.MultiHeadAttention(heads, head_dim)
            flat = tf.zeros((1, 2, heads * head_dim))
            layer(flat, flat)  # builds the einsum equations, softmax and dropout
            pair = tf.logical_and(mask[:, :, None], mask[:, None, :])  # (B, Tq, Tk)

            def core(q, k, v):  # the layer's attention after projections: (B, T, H, Dh)
                return layer._compute_attention(q, k, v, attention_mask=pair)[0]
        else:
            from msa_xla.kernels import masked_attention

            def core(q, k, v):
                return masked_attention(q, k, v, mask, mask, impl=impl)

        @tf.function(jit_compile=jit)
        def step(q, k, v):
            with tf.GradientTape() as tape:
                tape.watch([q, k, v])
                out = core(q, k, v)
                loss = tf.reduce_sum(out * v)
            grads = tape.gradient(loss, [q, k, v])
            return loss + sum(tf.reduce_sum(g) for g in grads)

        step(q, k, v).numpy()
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            step(q, k, v).numpy()
            times.append(time.perf_counter() - start)
        result["best_ms"] = round(1e3 * min(times), 3)
        result["median_ms"] = round(1e3 * statistics.median(times), 3)
    result["rss_inputs_mb"] = round(rss_inputs, 1)
    result["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    print("BENCH_JSON " + json.dumps(result))


def _peak_rss_mb():
    """This process's peak resident memory (MiB).

    VmHWM from /proc, not `getrusage(RUSAGE_SELF).ru_maxrss`: on Linux ru_maxrss survives
    fork + exec, so a child of a large parent (this benchmark holds six models) reports the
    parent's peak. VmHWM belongs to the new address space. ru_maxrss is the fallback.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except OSError:
        return float("nan")


def _worker_command(impl, seq_len, spec, jit):
    iters = spec["iters_long"] if seq_len >= 1024 else spec["iters"]
    return [sys.executable, os.path.abspath(__file__), "--worker",
            f"{impl},{seq_len},{spec['batch']},{spec['heads']},{spec['head_dim']},{iters},"
            f"{int(jit)}"]


def _worker_result(impl, seq_len, returncode, stdout, stderr):
    for line in stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON "):])
    return {"impl": impl, "seq_len": seq_len, "returncode": returncode,
            "error": (stderr or stdout)[-2000:]}


def bench_attention(spec, seq_lens, jit, one_process=False):
    """One subprocess per (impl, T), plus one memory baseline ('none') per T, one at a time.

    `one_process` (quick mode) runs every impl of a T in a single subprocess: it only checks
    that everything runs (the peak memory is then cumulative).
    """
    jobs = [(impl, t) for t in seq_lens for impl in ("none",) + CANDIDATES]
    if one_process:  # quick mode: every (impl, T) in one process, one after the other
        impls = "+".join(("none",) + CANDIDATES)
        results = []
        for t in seq_lens:
            proc = subprocess.run(_worker_command(impls, t, spec, jit), capture_output=True,
                                  text=True, timeout=600)
            found = [json.loads(line[len("BENCH_JSON "):]) for line in proc.stdout.splitlines()
                     if line.startswith("BENCH_JSON ")]
            results += found or [_worker_result("+", t, proc.returncode, proc.stdout,
                                                proc.stderr)]
    else:
        results = []
        for impl, t in jobs:
            proc = subprocess.run(_worker_command(impl, t, spec, jit), capture_output=True,
                                  text=True, timeout=900)
            results.append(_worker_result(impl, t, proc.returncode, proc.stdout, proc.stderr))
    base = {r["seq_len"]: r for r in results if r["impl"] == "none"}
    rows = []
    for row in results:
        if row["impl"] == "none":
            continue
        b = base.get(row["seq_len"], {})
        if "peak_rss_mb" in row and "peak_rss_mb" in b:
            row["baseline_rss_mb"] = b["peak_rss_mb"]
            row["peak_mb_over_baseline"] = round(row["peak_rss_mb"] - b["peak_rss_mb"], 1)
        rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq_lens", default="50,500,2048", help="key/query lengths T")
    parser.add_argument("--no_jit", action="store_true", help="graph mode instead of XLA")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # impls,T,B,H,Dh,iters,jit
    args = parser.parse_args(argv)
    if args.worker:
        impls, t, b, h, dh, iters, jit = args.worker.split(",")
        for impl in impls.split("+"):  # several only in quick mode (memory then cumulative)
            attention_worker(impl, int(t), int(b), int(h), int(dh), int(iters), bool(int(jit)))
        return 0
    try:
        seq_lens = tuple(int(x) for x in args.seq_lens.split(","))
    except ValueError:
        seq_lens = ()
    if not seq_lens or min(seq_lens) <= 0:
        parser.error(f"--seq_lens={args.seq_lens!r}: expected positive integers, e.g. 50,500")
    rows = bench_attention(SPEC, seq_lens, jit=not args.no_jit)
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
