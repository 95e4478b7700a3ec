"""results.json and the table printed at the end of a run.

results.json holds: per-seed test (and best validation) metrics, mean and std per metric over
the seeds, the full config, the dataset's metadata, samples/s, hardware, strategy, precision and
what XLA compiled, and where the best model was saved.
"""

from __future__ import annotations

import math
import os
import platform

import numpy as np

from msa_xla.metrics import METRIC_KEYS
from msa_xla.runtime import storage


def summarize(per_seed: list[dict]) -> dict:
    """{metric: {"mean", "std"}} over the seeds' test metrics (std: population, ddof=0)."""
    summary = {}
    for key in METRIC_KEYS:
        values = np.array([run["test"][key] for run in per_seed if key in run["test"]], float)
        if values.size:
            summary[key] = {"mean": float(values.mean()), "std": float(values.std())}
    return summary


def hardware_info() -> dict:
    import tensorflow as tf

    from msa_xla.runtime.allocator import cpu_allocator

    return {"host": platform.node(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "tensorflow": tf.__version__, "cpu_allocator": cpu_allocator(),
            "devices": [d.name for d in tf.config.list_logical_devices()]}


def build_results(*, config: dict, metadata: dict, per_seed: list[dict], run_info: dict) -> dict:
    """The results.json document."""
    samples = [run["samples_per_second"] for run in per_seed if run.get("samples_per_second")]
    best = min(per_seed, key=lambda run: run["best_val_MAE"]) if per_seed else None
    return {
        "per_seed": per_seed,
        "summary": summarize(per_seed),
        "samples_per_second": float(np.mean(samples)) if samples else None,
        "best_seed": best["seed"] if best else None,
        "config": config,
        "data_metadata": metadata,
        **run_info,
    }


def write_results(path: str, results: dict) -> None:
    """results.json, atomically, local or remote (gs://)."""
    storage.write_json_atomic(path, results, indent=2, sort_keys=False, default=_jsonable)


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def _fmt(value: float, key: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}" if key in ("MAE", "Corr") else f"{100 * value:.2f}"


def format_table(results: dict) -> str:
    """Plain-text table: one row per seed, then mean ± std. Accuracies/F1 in %, MAE/Corr raw."""
    names = ("seed",) + METRIC_KEYS
    rows = [[str(run["seed"])] + [_fmt(run["test"].get(k), k) for k in METRIC_KEYS]
            for run in results["per_seed"]]
    summary = results["summary"]
    if len(results["per_seed"]) > 1:
        rows.append(["mean"] + [_fmt(summary[k]["mean"], k) for k in METRIC_KEYS])
        rows.append(["std"] + [_fmt(summary[k]["std"], k) for k in METRIC_KEYS])
    widths = [max(len(n), *(len(r[i]) for r in rows)) for i, n in enumerate(names)]
    line = "  ".join(n.rjust(w) for n, w in zip(names, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    extra = []
    if results.get("samples_per_second"):
        extra.append(f"train samples/s {results['samples_per_second']:.0f}")
    for key in ("strategy", "replicas", "precision", "jit"):
        if results.get(key) is not None:
            extra.append(f"{key} {results[key]}")
    if extra:
        out.append("; ".join(extra))
    return "\n".join(out)
