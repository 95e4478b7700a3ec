"""tools/bench.py's verdict and table: the performance issue's targets, met or not, and the
terminal report. Both read only the JSON-able result dict, so a saved `--json` file can be
reported again with `format_report(json.load(f))`.
"""

TARGET_VS_BASELINE = {128: 1.5, 256: 1.3}  # jit / stock baseline, by model_dim
TARGET_JIT_VS_NOJIT = 0.95
TARGET_CHUNKED_MEMORY, TARGET_CHUNKED_TIME = 0.5, 1.5  # chunked / reference at the longest T


# ---- targets -------------------------------------------------------------------------------------
def evaluate_targets(result):
    targets = []
    for run in result["training"]:
        d = run["model_dim"]
        need = TARGET_VS_BASELINE.get(d)
        r = run["ratios"]["msa_xla_jit/keras_baseline"]
        if need is not None:
            target = {"target": f"d={d}: jit >= {need}x keras baseline",
                      "measured_best": r["best"], "measured_median": r["median"],
                      "threshold": need, "met": r["best"] >= need and r["median"] >= need}
            # What the target asks of the step, beside what its matmuls reach on their own.
            base_mfu = run["candidates"]["keras_baseline"].get("best_mfu_float32")
            if base_mfu is not None:
                target["needed_mfu_float32"] = round(need * base_mfu, 3)
            yardstick = [row for row in result.get("projection_matmuls", [])
                         if row["model_dim"] == d and row["pass"] == "all"]
            if yardstick:
                target["projection_matmuls_of_peak_float32"] = yardstick[0]["best_of_peak_float32"]
            targets.append(target)
        r = run["ratios"]["msa_xla_jit/msa_xla_nojit"]
        targets.append({"target": f"d={d}: jit >= {TARGET_JIT_VS_NOJIT}x no-jit",
                        "measured_best": r["best"], "measured_median": r["median"],
                        "threshold": TARGET_JIT_VS_NOJIT,
                        "met": r["best"] >= TARGET_JIT_VS_NOJIT
                        and r["median"] >= TARGET_JIT_VS_NOJIT})
        recompiled = [n for n, c in run["candidates"].items() if c["recompiled_after_warmup"]]
        targets.append({"target": f"d={d}: no recompilation after warm-up",
                        "recompiled": recompiled, "met": not recompiled})
    by = {(row["impl"], row["seq_len"]): row for row in result["attention"]["rows"]}
    longest = max(result["attention"]["seq_lens"])
    ref, chk = by.get(("reference", longest), {}), by.get(("chunked", longest), {})
    if "peak_mb_over_baseline" in ref and "peak_mb_over_baseline" in chk:
        mem = chk["peak_mb_over_baseline"] / max(ref["peak_mb_over_baseline"], 1e-9)
        tim = chk["median_ms"] / ref["median_ms"]
        targets.append({"target": f"T={longest}: chunked memory <= {TARGET_CHUNKED_MEMORY}x "
                                  "reference", "measured": round(mem, 3),
                        "threshold": TARGET_CHUNKED_MEMORY, "met": mem <= TARGET_CHUNKED_MEMORY})
        targets.append({"target": f"T={longest}: chunked time <= {TARGET_CHUNKED_TIME}x "
                                  "reference", "measured": round(tim, 3),
                        "threshold": TARGET_CHUNKED_TIME, "met": tim <= TARGET_CHUNKED_TIME})
    return targets


# ---- table ---------------------------------------------------------------------------------------
def _rule(header):
    """The markdown rule under a `| a | b |` header: one run of dashes per column."""
    return "|" + "|".join("-" * len(column) for column in header.split("|")[1:-1]) + "|"


def format_report(result):
    out = []
    host = result["host"]
    cfg = result["config"]
    out.append(f"host: {host['cpu']}, {host['cpus']} CPUs ({' '.join(host['isa'])}), "
               f"TF {host['tensorflow']}, tf_keras {host['tf_keras']}")
    out.append(f"command: {result['command']}  (load average {result['load_average_start'][0]} "
               f"at start, {result['load_average_end'][0]} at end, on {host['cpus']} CPUs)")
    peaks = result["matmul_peak"]
    out.append(f"matmul peak ({peaks['float32']['n']}^3): float32 {peaks['float32']['best_gflops']} "
               f"GFLOP/s, bfloat16 {peaks['bfloat16']['best_gflops']} GFLOP/s "
               f"(best of {result['settings']['peak_reps']})")
    rows = result.get("projection_matmuls", [])
    if rows:
        passes = ("forward", "input gradient", "weight gradient")
        out.append("")
        out.append("Projection matmuls on their own, XLA float32, B*T rows: best GFLOP/s (share "
                   "of the float32 peak)")
        header = f"| {'d/ff':<8} | {'projection':<16} | " + " | ".join(
            f"{p:>15}" for p in passes) + " |"
        out.append(header)
        out.append(_rule(header))
        for d in sorted({row["model_dim"] for row in rows}):
            at_d = [row for row in rows if row["model_dim"] == d]
            size = f"{d}/{at_d[0]['ff_dim']}"
            for name in dict.fromkeys(row["projection"] for row in at_d if row["pass"] != "all"):
                cells = {row["pass"]: f"{row['best_gflops']:.1f} "
                                      f"({row['best_of_peak_float32']:.0%})"
                         for row in at_d if row["projection"] == name}
                out.append(f"| {size:<8} | {name:<16} | "
                           + " | ".join(f"{cells[p]:>15}" for p in passes) + " |")
            (every,) = [row for row in at_d if row["pass"] == "all"]
            out.append(f"  d={d}: all of them, FLOPs over time: {every['best_gflops']:.1f} "
                       f"GFLOP/s, {every['best_of_peak_float32']:.1%} of the float32 peak")
    inp = result["input_pipeline"]
    out.append("")
    out.append(f"Training, float32, B={cfg['batch_size']} T={cfg['seq_len']} dims "
               f"{cfg['text_dim']}/{cfg['audio_dim']}/{cfg['video_dim']}, {cfg['num_heads']} heads, "
               f"{cfg['n_layers_mod']} encoder + {cfg['n_layers_fuse']} fusion layers; samples/s "
               "through model.fit, interleaved rounds")
    header = (f"| {'d/ff':<8} | {'candidate':<28} | {'best/s':>7} | {'median/s':>8} | "
              f"{'x base (best/med)':>17} | {'MFU f32':>7} | {'MFU bf16':>8} | {'retrace':>7} |")
    out.append(header)
    out.append(_rule(header))
    labels = {"msa_xla_jit": "(1) MSASeqLevelModel jit", "msa_xla_nojit":
              "(2) MSASeqLevelModel no-jit", "keras_baseline": "(3) stock tf_keras baseline"}
    for run in result["training"]:
        base = run["candidates"]["keras_baseline"]
        for name, c in run["candidates"].items():  # the order they were built in
            ratio = (f"{c['best_samples_per_s'] / base['best_samples_per_s']:.2f}/"
                     f"{c['median_samples_per_s'] / base['median_samples_per_s']:.2f}")
            retrace = f"{c['tracing_count_after_warmup']}->{c['tracing_count_end']}"
            size = f"{run['model_dim']}/{run['ff_dim']}"
            out.append(f"| {size:<8} | {labels[name]:<28} | "
                       f"{c['best_samples_per_s']:>7.1f} | {c['median_samples_per_s']:>8.1f} | "
                       f"{ratio:>17} | {c['best_mfu_float32']:>7.1%} | "
                       f"{c['best_mfu_bfloat16']:>8.1%} | {retrace:>7} |")
        r = run["ratios"]["msa_xla_jit/msa_xla_nojit"]
        out.append(f"  d={run['model_dim']}: {run['params']:,} parameters (all three), "
                   f"{run['flops_per_sample']['train'] / 1e6:.0f} MFLOP/sample train; jit/no-jit "
                   f"best {r['best']:.2f}, median {r['median']:.2f}; "
                   f"jit/baseline median of per-round ratios "
                   f"{run['ratios']['msa_xla_jit/keras_baseline']['median_of_rounds']:.2f}")
    out.append(f"Input pipeline (built-in dataset, batch {inp['batch_size']}): median "
               f"{inp['median_examples_per_s']:.0f} examples/s, best {inp['best_examples_per_s']:.0f}"
               f" = {result['input_vs_training']:.0f}x the best training rate above")
    att = result["attention"]
    out.append("")
    out.append(f"Attention core forward+backward, B={att['batch']} H={att['heads']} "
               f"Dh={att['head_dim']}, {'XLA (jit_compile)' if att['jit'] else 'graph'}; memory = "
               "subprocess peak RSS minus an inputs-only subprocess")
    header = f"| {'T':>5} | {'impl':<10} | {'median ms':>9} | {'best ms':>8} | {'peak MB':>8} |"
    out.append(header)
    out.append(_rule(header))
    for row in att["rows"]:
        if "error" in row:
            out.append(f"| {row['seq_len']:>5} | {row['impl']:<10} | error: "
                       f"{row['error'].strip().splitlines()[-1][:60]}")
            continue
        out.append(f"| {row['seq_len']:>5} | {row['impl']:<10} | {row['median_ms']:>9.2f} | "
                   f"{row['best_ms']:>8.2f} | {row.get('peak_mb_over_baseline', float('nan')):>8.1f} |")
    out.append("")
    out.append("Targets:")
    for t in result["targets"]:
        if "measured_best" in t:
            got = f"best {t['measured_best']:.2f}, median {t['measured_median']:.2f}"
            if "needed_mfu_float32" in t and "projection_matmuls_of_peak_float32" in t:
                got += (f" (needs the step at {t['needed_mfu_float32']:.1%} of the float32 peak; "
                        f"its projection matmuls alone reach "
                        f"{t['projection_matmuls_of_peak_float32']:.1%})")
        elif "measured" in t:
            got = f"{t['measured']:.2f}"
        else:
            got = f"recompiled: {t['recompiled'] or 'none'}"
        out.append(f"  [{'MET' if t['met'] else 'MISSED'}] {t['target']}: {got}")
    return "\n".join(out)
