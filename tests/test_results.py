"""results.py: mean/std over seeds, a complete JSON document, a table with the eight metrics."""
import json

import numpy as np
import pytest

from msa_xla.metrics import METRIC_KEYS
from msa_xla.trainer.results import build_results, format_table, summarize, write_results


def _seed(seed, mae):
    test = {key: 0.5 for key in METRIC_KEYS}
    test["MAE"] = mae
    return {"seed": seed, "test": test, "best_val_MAE": mae, "samples_per_second": 100.0}


def test_summary_is_mean_and_population_std_per_metric():
    summary = summarize([_seed(1, 0.4), _seed(2, 0.6)])
    assert set(summary) == set(METRIC_KEYS)
    assert summary["MAE"]["mean"] == pytest.approx(0.5)
    assert summary["MAE"]["std"] == pytest.approx(np.std([0.4, 0.6]))


def test_results_json_and_table(tmp_path):
    res = build_results(config={"model": "seqlevel"}, metadata={"seq_len": 50},
                        per_seed=[_seed(1, 0.4), _seed(2, 0.6)],
                        run_info={"strategy": "OneDeviceStrategy", "replicas": 1,
                                  "precision": "float32", "jit": "whole_step"})
    assert res["best_seed"] == 1 and res["samples_per_second"] == 100.0
    path = tmp_path / "results.json"
    write_results(str(path), res)
    assert json.loads(path.read_text())["summary"]["MAE"]["mean"] == pytest.approx(0.5)
    table = format_table(res)
    for key in METRIC_KEYS:
        assert key in table
    assert "mean" in table and "std" in table and "50.00" in table and "0.4000" in table
