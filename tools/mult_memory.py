#!/usr/bin/env python
"""Peak resident memory of msa_xla's MulT training step (MMSA's MOSI config, as bench_peers).

    /usr/bin/time -v python tools/mult_memory.py --shapes unaligned --batch 32

Builds `MulTModel` exactly as `tools/bench_peers.py` does (MMSA's config: needs the peers
extra; TF's BFC pool unless `TF_CPU_ALLOCATOR_USE_BFC=false`), runs `--steps` jit-compiled train
steps on random inputs and prints the process's peak RSS (`ru_maxrss`) and the median
samples/s of the steps after the first (which compiles). Memory, unlike speed, is a robust
number on a shared host; for speed beside MMSA, use bench_peers.

`--cap_gb` stops the process (exit 1, one line) once its resident memory passes the cap, so a
step that cannot fit does not push the host into its OOM killer.
"""
import argparse
import os
import resource
import statistics
import sys
import threading
import time

TOOLS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [TOOLS_DIR]

import bench_peers  # noqa: E402  (puts the repository on sys.path too)

from msa_xla.runtime.allocator import cpu_allocator  # noqa: E402


def _rss_gb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1e6  # kB -> GB
    return 0.0


def _watchdog(cap_gb):
    while True:
        rss = _rss_gb()
        if rss > cap_gb:
            print(f"resident memory {rss:.1f} GB passed the cap of {cap_gb} GB: stopped",
                  flush=True)
            os._exit(1)
        time.sleep(0.1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="unaligned", choices=sorted(bench_peers.SHAPES))
    parser.add_argument("--batch", type=int, default=bench_peers.BATCH)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--attention_impl", default=None,
                        help="default: what bench_peers uses for these shapes")
    parser.add_argument("--cap_gb", type=float, default=16.0)
    args = parser.parse_args(argv)
    threading.Thread(target=_watchdog, args=(args.cap_gb,), daemon=True).start()
    bench_peers.BATCH = args.batch  # random_batch and the step read it
    seq_lens = bench_peers.SHAPES[args.shapes]
    config = bench_peers.mmsa_config(seq_lens)
    features, masks, labels = bench_peers.random_batch(seq_lens)
    impl = args.attention_impl or bench_peers.attention_impl_for(args.shapes)
    step, params, _ = bench_peers.xla_step_fn(config, seq_lens, features, masks, labels,
                                              attention_impl=impl)
    rates = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()
        rates.append(args.batch / (time.perf_counter() - start))
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    speed = (f", {statistics.median(rates[1:]):.2f} samples/s (median after the first step)"
             if len(rates) > 1 else "")
    print(f"{args.shapes} {seq_lens} batch {args.batch} attention_impl={impl}, CPU allocator "
          f"{cpu_allocator()}: {params:,} parameters, {args.steps} "
          f"steps, loss {loss:.4f}, peak RSS {peak_kb / 1e6:.2f} GB ({peak_kb:,} kB){speed}")


if __name__ == "__main__":
    main()
