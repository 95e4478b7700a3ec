#!/usr/bin/env python
"""msa_xla's MulT against MMSA's PyTorch MulT on this host, and MMSA data parity checks.

Needs the optional extra: `pip install -e '.[peers]'` (mmsa 2.2.1 and a CPU build of torch).

    python tools/bench_peers.py                      # training speed, aligned and unaligned
    python tools/bench_peers.py --json peers.json    # also write the numbers
    python tools/bench_peers.py --check-model        # same weights -> same outputs (eval mode)
    python tools/bench_peers.py --check-data aligned_50.pkl   # MMSA's loader == --format mmsa

Speed: one process, one full training step of each side timed over interleaved rounds (the
order alternates every round; this is a shared 2-core VM whose speed drifts for seconds at a
time, docs/ARCHITECTURE.md §6), best and median samples/s of each and their ratios. A step is forward,
L1 loss, backward, gradient clipping by value 0.6 and an Adam update (MMSA's MulT trainer,
`trains/singleTask/MULT.py`, with its MOSI config: lr 0.002, grad_clip 0.6).
- MMSA: `AMIO(get_config_regression('mult', 'mosi'))` with feature dims 300/74/47, eager
  PyTorch, `torch.set_num_threads(2)`.
- msa_xla: `MulTModel` with the same config, the whole step one `tf.function(jit_compile=True)`,
  Adam as the trainer builds it (`make_optimizer`: one fused update op per variable).
  MMSA's config has `attn_mask: true` and its encoder has no positions, so the model is built
  with `causal_mask=True, positional=False`: the same computation, plus padding masks.
  Attention core: `fused` for both shapes (its backward pass recomputes the attention maps: the
  unaligned step alone peaks at 8.3 GB, `tools/mult_memory.py`, and fits beside MMSA's).
  TF's CPU allocator is the trainer's: the BFC pool (msa_xla/runtime/allocator.py).
- Memory for both: torch takes its CPU tensors from malloc. Alone, glibc raises its mmap
  threshold as torch frees large blocks and serves them from the heap again; beside TF's BFC
  pool it did not, and MMSA lost 10-25% to page faults (`TF_CPU_ALLOCATOR_USE_BFC=true`
  vs `false`, same tool). So this tool fixes glibc's threshold at its 32 MiB maximum and keeps
  freed memory (`mallopt`, `keep_malloc_heap`): MMSA then ran as fast as beside a malloc TF
  (43.7 vs 41.9 samples/s median, aligned, back to back; README).
Batch 32; aligned 50/50/50 and unaligned 50/375/500 (text/audio/video); random features with
random true lengths, zero padding after them (MMSA reads the padding as data; msa_xla masks it).

--check-model copies MMSA's MulT weights into MulTModel and compares eval outputs on clips
without padding (MMSA's unpadded Conv1d gets the input with (k-1)/2 zero steps on each side,
which is what `same` padding does): exits 1 when they differ by more than 1e-4.

--check-data PICKLE converts PICKLE with `--format mmsa` (sources.read_source + writer.convert,
into a temporary folder), reads every split back with make_dataset, and compares with what
MMSA's `MMDataLoader` yields for the same file, value for value: features, audio/vision
lengths (unaligned), labels, ids and, when the pickle has `text_bert`, the token ids and mask.
Exits 1 on any difference and names it.
"""
import argparse
import ctypes
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
TOOLS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TOOLS_DIR)
sys.path[:0] = [TOOLS_DIR, REPO_DIR]

import numpy as np  # noqa: E402
from bench import host_info  # noqa: E402

from msa_xla.data.synthetic import MOSI_DIMS as DIMS  # noqa: E402  (300, 74, 47)
from msa_xla.runtime.allocator import prefer_pooled_cpu_allocator  # noqa: E402

prefer_pooled_cpu_allocator()  # as the trainer runs (msa_xla/runtime/allocator.py)

TORCH_THREADS = 2
BATCH = 32
SHAPES = {"aligned": (50, 50, 50), "unaligned": (50, 375, 500)}
# Steps per timed round and rounds, per shape: a round of each side takes a few seconds.
PLAN = {"aligned": dict(steps=4, rounds=5), "unaligned": dict(steps=1, rounds=3)}
QUICK_PLAN = {"aligned": dict(steps=2, rounds=2), "unaligned": dict(steps=1, rounds=2)}
# msa_xla's attention core per shape. `fused` for the unaligned shapes too: `chunked` keeps less
# memory (6.8 GB against 8.3 GB peak) but ran 2.74 against 3.95 samples/s (tools/mult_memory.py).
ATTENTION_IMPL = {"aligned": "fused", "unaligned": "fused"}


def attention_impl_for(shape_name):
    return ATTENTION_IMPL[shape_name]


def _peers():
    """Imports of the optional extra, with one clear line when it is missing."""
    try:
        import torch
        from MMSA import get_config_regression
        from MMSA.models import AMIO
    except ImportError as err:
        sys.exit(f"error: {err.name} is not installed: pip install -e '.[peers]'")
    return torch, get_config_regression, AMIO


def mmsa_config(seq_lens):
    """MMSA's own regression config for MulT on MOSI, with this benchmark's feature dims."""
    _, get_config_regression, _ = _peers()
    config = get_config_regression("mult", "mosi")
    config.update(feature_dims=list(DIMS), seq_lens=list(seq_lens), train_mode="regression",
                  num_classes=1, device="cpu")
    return config


def mult_kwargs(config, seq_lens, **overrides):
    """MulTModel arguments equal to an MMSA MulT config."""
    d, heads = config.dst_feature_dim_nheads
    kwargs = dict(seq_len=tuple(seq_lens), text_dim=DIMS[0], audio_dim=DIMS[1],
                  video_dim=DIMS[2], model_dim=d, num_heads=heads, n_levels=config.nlevels,
                  conv_kernel_sizes=(config.conv1d_kernel_size_l, config.conv1d_kernel_size_a,
                                     config.conv1d_kernel_size_v),
                  causal_mask=bool(config.attn_mask), positional=False)
    for name in ("attn_dropout", "attn_dropout_a", "attn_dropout_v", "relu_dropout",
                 "embed_dropout", "res_dropout", "output_dropout", "text_dropout"):
        kwargs[name] = float(config[name])
    kwargs.update(overrides)
    return kwargs


def random_batch(seq_lens, seed=0):
    """Features (B, T, D) float32 zero-padded after random true lengths, masks, labels (B, 1)."""
    rng = np.random.default_rng(seed)
    features, masks = [], []
    for length, dim in zip(seq_lens, DIMS):
        lengths = rng.integers(max(1, length // 2), length + 1, size=BATCH)
        mask = np.arange(length)[None, :] < lengths[:, None]
        features.append((rng.standard_normal((BATCH, length, dim)) * mask[..., None])
                        .astype(np.float32))
        masks.append(mask)
    labels = rng.uniform(-3, 3, (BATCH, 1)).astype(np.float32)
    return features, masks, labels


# ---- the two training steps -----------------------------------------------------------------
def torch_step_fn(config, features, labels):
    torch, _, AMIO = _peers()
    torch.manual_seed(0)
    model = AMIO(config)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    criterion = torch.nn.L1Loss()
    text, audio, vision = (torch.from_numpy(x) for x in features)
    target = torch.from_numpy(labels)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        optimizer.zero_grad()
        loss = criterion(model(text, audio, vision)["M"], target)
        loss.backward()
        torch.nn.utils.clip_grad_value_(params, config.grad_clip)
        optimizer.step()
        return loss.item()

    return step, sum(p.numel() for p in params)


def xla_step_fn(config, seq_lens, features, masks, labels, attention_impl="fused"):
    import tensorflow as tf
    import tf_keras as keras

    from msa_xla import MulTModel
    from msa_xla.trainer.step import make_optimizer

    keras.utils.set_random_seed(0)
    model = MulTModel(**mult_kwargs(config, seq_lens, attention_impl=attention_impl))
    inputs = tuple(tf.constant(x) for x in features) + tuple(tf.constant(m) for m in masks)
    target = tf.constant(labels)
    model(inputs)
    optimizer = make_optimizer(config.learning_rate, clipnorm=0)  # the trainer's Adam
    clip = float(config.grad_clip)

    @tf.function(jit_compile=True)
    def train_step(inputs, target):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.abs(model(inputs, training=True) - target))
        grads = tape.gradient(loss, model.trainable_variables)
        grads = [tf.clip_by_value(g, -clip, clip) for g in grads]
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    def step():
        return float(train_step(inputs, target))

    return step, model.count_params(), train_step


def time_steps(step, steps):
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    elapsed = time.perf_counter() - start
    if not np.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss}")
    return steps * BATCH / elapsed


def bench_shape(name, plan, log):
    import torch

    seq_lens = SHAPES[name]
    config = mmsa_config(seq_lens)
    features, masks, labels = random_batch(seq_lens)
    candidates = {}
    log(f"{name} {seq_lens}: building MMSA's MulT and msa_xla's MulTModel")
    candidates["mmsa_torch"], torch_params = torch_step_fn(config, features, labels)
    candidates["msa_xla_jit"], xla_params, train_step = xla_step_fn(
        config, seq_lens, features, masks, labels, attention_impl=attention_impl_for(name))
    start = time.perf_counter()
    candidates["msa_xla_jit"]()  # warm-up: XLA compiles (the first call), torch allocates
    for step in candidates.values():
        step()
    log(f"  warm-up {time.perf_counter() - start:.1f} s")
    rates = {k: [] for k in candidates}
    order = list(candidates)
    for r in range(plan["rounds"]):
        for key in (order if r % 2 == 0 else order[::-1]):
            rates[key].append(time_steps(candidates[key], plan["steps"]))
        log(f"  round {r + 1}/{plan['rounds']}: " + ", ".join(
            f"{k} {v[-1]:.1f}" for k, v in rates.items()) + " samples/s")
    summary = {k: {"best": max(v), "median": statistics.median(v), "rounds": v}
               for k, v in rates.items()}
    return {
        "seq_lens": list(seq_lens), "batch_size": BATCH, "steps_per_round": plan["steps"],
        "msa_xla_attention_impl": attention_impl_for(name),
        "samples_per_second": summary,
        "ratio_best": summary["msa_xla_jit"]["best"] / summary["mmsa_torch"]["best"],
        "ratio_median": summary["msa_xla_jit"]["median"] / summary["mmsa_torch"]["median"],
        "parameters": {"mmsa_torch": int(torch_params), "msa_xla": int(xla_params)},
        "xla_traces": train_step.experimental_get_tracing_count(),
        "torch_threads": torch.get_num_threads(),
    }


def keep_malloc_heap():
    """glibc: blocks up to 32 MiB from the reused heap, not fresh pages (see the docstring).

    Returns what was set, or None where there is no glibc `mallopt` (the host line says so).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    settings = {"M_MMAP_THRESHOLD": (-3, 32 << 20), "M_TRIM_THRESHOLD": (-1, 256 << 20)}
    if not all(libc.mallopt(option, value) == 1 for option, value in settings.values()):
        return None
    return {name: value for name, (_, value) in settings.items()}


def bench(args, log):
    import torch

    malloc = keep_malloc_heap()  # before torch's first tensor
    torch.set_num_threads(TORCH_THREADS)
    plan = QUICK_PLAN if args.quick else PLAN
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    host = host_info()  # bench.py's: CPU name and ISA, Python, TF
    result = {"host": {**host, "cores": os.cpu_count(), "load_average_start": load,
                       "torch": torch.__version__, "glibc_malloc": malloc},
              "shapes": {}}
    for name in args.shapes.split(","):
        result["shapes"][name] = bench_shape(name, plan[name], log)
    result["host"]["load_average_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return result


def format_bench(result):
    host = result["host"]
    lines = [f"CPU: {host['cpu']} ({host['cores']} cores), torch {host['torch']} "
             f"({TORCH_THREADS} threads), TF {host['tensorflow']} (CPU allocator "
             f"{host.get('cpu_allocator', '?')}, glibc malloc "
             f"{'kept heap' if host.get('glibc_malloc') else 'default'}); load average "
             f"{host['load_average_start']:.2f} -> {host['load_average_end']:.2f}", "",
             "| shapes t/a/v | candidate | best samples/s | median | parameters |",
             "|---|---|---|---|---|"]
    for name, res in result["shapes"].items():
        shape = "/".join(str(t) for t in res["seq_lens"])
        for key, label in (("mmsa_torch", "MMSA MulT (PyTorch, eager)"),
                           ("msa_xla_jit", "msa_xla MulTModel (jit_compile)")):
            rate = res["samples_per_second"][key]
            params = res["parameters"]["mmsa_torch" if key == "mmsa_torch" else "msa_xla"]
            lines.append(f"| {shape} ({name}) | {label} | {rate['best']:.1f} | "
                         f"{rate['median']:.1f} | {params:,} |")
    lines.append("")
    for name, res in result["shapes"].items():
        lines.append(f"{name}: msa_xla / MMSA = {res['ratio_best']:.2f}x best, "
                     f"{res['ratio_median']:.2f}x median")
    return "\n".join(lines)


# ---- --check-model ------------------------------------------------------------------------------
def copy_mmsa_weights(torch_model, model):
    """MMSA MULT (inside AMIO) weights -> MulTModel (built)."""
    short = {"text": "l", "audio": "a", "video": "v"}
    mult = torch_model.Model

    def numpy(t):
        return t.detach().cpu().numpy()

    def encoder(ours, theirs):
        for layer, their in zip(ours.encoder_layers, theirs.layers):
            att = their.self_attn
            layer.attention.set_weights([numpy(att.in_proj_weight).T, numpy(att.in_proj_bias),
                                         numpy(att.out_proj.weight).T, numpy(att.out_proj.bias)])
            for norm, their_norm in ((layer.attention_norm, their.layer_norms[0]),
                                     (layer.ffn_norm, their.layer_norms[1])):
                norm.set_weights([numpy(their_norm.weight), numpy(their_norm.bias)])
            for dense, linear in ((layer.ffn_inner, their.fc1), (layer.ffn_outer, their.fc2)):
                dense.set_weights([numpy(linear.weight).T, numpy(linear.bias)])
        ours.final_norm.set_weights([numpy(theirs.layer_norm.weight),
                                     numpy(theirs.layer_norm.bias)])

    for ours, (target, source) in zip(model.crossmodal, model.pairs):
        encoder(ours, getattr(mult, f"trans_{short[target]}_with_{short[source]}"))
    for ours, target in zip(model.memories, ("text", "audio", "video")):
        encoder(ours, getattr(mult, f"trans_{short[target]}_mem"))
    for conv, theirs in ((model.text_projection, mult.proj_l),
                         (model.audio_projection, mult.proj_a),
                         (model.video_projection, mult.proj_v)):
        conv.set_weights([numpy(theirs.weight).transpose(2, 1, 0)])  # (d, F, k) -> (k, F, d)
    for dense, theirs in ((model.proj1, mult.proj1), (model.proj2, mult.proj2),
                          (model.output_layer, mult.out_layer)):
        dense.set_weights([numpy(theirs.weight).T, numpy(theirs.bias)])


def check_model(log, tolerance=1e-4):
    import tensorflow as tf

    from msa_xla import MulTModel

    torch, _, AMIO = _peers()
    worst = 0.0
    for name, seq_lens in (("aligned", (12, 12, 12)), ("unaligned", (12, 30, 20))):
        config = mmsa_config(seq_lens)
        torch.manual_seed(0)
        theirs = AMIO(config).eval()
        model = MulTModel(**mult_kwargs(config, seq_lens))
        rng = np.random.default_rng(1)
        features = [rng.standard_normal((3, t, dim)).astype(np.float32)
                    for t, dim in zip(seq_lens, DIMS)]
        model(tuple(tf.constant(x) for x in features))
        copy_mmsa_weights(theirs, model)
        pads = [(k - 1) // 2 for k in model.conv_kernel_sizes]
        with torch.no_grad():
            want = theirs(*[torch.from_numpy(np.pad(x, ((0, 0), (p, p), (0, 0))))
                            for x, p in zip(features, pads)])["M"].numpy()
        masks = tuple(tf.ones((3, t), tf.bool) for t in seq_lens)
        got = model(tuple(tf.constant(x) for x in features) + masks, training=False).numpy()
        diff = float(np.abs(want - got).max())
        worst = max(worst, diff)
        log(f"{name} {seq_lens}: MMSA {want.ravel().round(5).tolist()} msa_xla "
            f"{got.ravel().round(5).tolist()} max |diff| {diff:.2e}")
    ok = worst <= tolerance
    print(f"check-model: {'same outputs' if ok else 'DIFFERENT outputs'} "
          f"(max |diff| {worst:.2e}, tolerance {tolerance:g})")
    return 0 if ok else 1


# ---- CLI ----------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--shapes", default="aligned,unaligned",
                        help="comma-separated subset of aligned,unaligned")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and steps")
    parser.add_argument("--check-model", action="store_true",
                        help="compare outputs with MMSA's MulT on copied weights, then exit")
    parser.add_argument("--check-data", metavar="PICKLE",
                        help="compare --format mmsa with MMSA's MMDataLoader on PICKLE, then exit")
    args = parser.parse_args(argv)

    def log(line):
        print(line, file=sys.stderr, flush=True)

    if args.check_model:
        return check_model(log)
    if args.check_data:
        from mmsa_parity import check_data  # tools/mmsa_parity.py

        return check_data(args.check_data, log)
    bad = set(args.shapes.split(",")) - set(SHAPES)
    if bad:
        parser.error(f"--shapes: unknown {sorted(bad)} (expected aligned, unaligned)")
    result = bench(args, log)
    print(format_bench(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
