"""predict.py: a CSV with every clip's id, prediction and label, in source order; the trainer's
test and validation metrics equal a recomputation over every clip of the split (neither split
divides by the batch, so the zero-weight padding of the last evaluation batch runs)."""
import csv
import json

import numpy as np
import pytest
import tf_keras as keras

from msa_xla.data import make_dataset, synthetic
from msa_xla.metrics import METRIC_KEYS, msa_metrics
from msa_xla.trainer.config import TrainConfig
from tests.train_helpers import DIMS, SEQ_LEN, make_tiny_dataset

SIZES = (32, 11, 13)  # train / valid / test; batch 8: the last valid and test batches are padded


def _train(tmp_path):
    """A one-epoch trainer run on SIZES: (data folder, workdir)."""
    from msa_xla.trainer.main import run

    data_dir = make_tiny_dataset(tmp_path / "data", sizes=SIZES)
    workdir = tmp_path / "run"
    cfg = TrainConfig(data_dir=data_dir, workdir=str(workdir), model="msa", model_dim=16,
                      num_heads=2, ff_dim=32, n_layers_mod=1, n_layers_fuse=1, batch_size=8,
                      epochs=1, verbose=0)
    try:
        assert run(cfg) == 0
    finally:
        keras.backend.experimental.disable_tf_random_generator()  # run() enables it
    return data_dir, workdir


def _labels(split):
    """The split's labels as the synthetic generator made them (not read back by msa_xla)."""
    made = synthetic.generate(SIZES, seq_len=SEQ_LEN, dims=DIMS, seed=5)[split]
    return np.asarray(made.labels, np.float32).reshape(-1)


def _saved_model_predictions(model_path, data_dir, split):
    """Keras' own predict loop over every clip of the split (batches of 8, the last partial)."""
    import msa_xla.models  # noqa: F401  (registers the classes)

    model = keras.models.load_model(str(model_path))
    dataset = make_dataset(data_dir, split, 8, shuffle=False, drop_remainder=False)
    return model.predict(dataset, verbose=0).reshape(-1)


@pytest.mark.slow
def test_results_json_and_the_predict_csv_equal_a_recomputation_over_every_clip(tmp_path):
    # One trained run for both checks (each would otherwise train its own).
    from msa_xla import predict

    data_dir, workdir = _train(tmp_path)

    # results.json: the test metrics and the best validation MAE.
    res = json.loads((workdir / "results.json").read_text())
    seed = res["per_seed"][0]
    labels = _labels("test")
    preds = _saved_model_predictions(seed["model_path"], data_dir, "test")
    assert len(labels) == len(preds) == res["data_metadata"]["splits"]["test"]["count"] == 13
    expected = msa_metrics(labels, preds)
    assert set(seed["test"]) == set(METRIC_KEYS)
    for key in METRIC_KEYS:  # 13 clips: one clip more or less moves an accuracy by >= 1/16
        assert seed["test"][key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    # One epoch: the best validation epoch is the saved model; 11 clips, 5 of padding.
    valid = _saved_model_predictions(seed["model_path"], data_dir, "valid")
    assert len(valid) == 11
    assert seed["best_val_MAE"] == pytest.approx(
        float(np.mean(np.abs(valid - _labels("valid")))), rel=1e-5)

    # predict's CSV, row for row.
    output = tmp_path / "pred.csv"
    # batch 4: 13 clips end in a batch of 1, which must be predicted and kept
    assert predict.run(str(workdir), data_dir, "test", str(output), batch_size=4) == 0
    rows = list(csv.DictReader(output.open()))
    assert [r["id"] for r in rows] == [f"synthtest_{i:05d}" for i in range(13)]
    expected = _saved_model_predictions(workdir / "best_model.keras", data_dir, "test")
    np.testing.assert_allclose([float(r["prediction"]) for r in rows], expected, atol=2e-6)
    np.testing.assert_allclose([float(r["label"]) for r in rows], _labels("test"), atol=1e-6)


def test_predict_missing_model_is_one_line_exit_2(tmp_path, capsys):
    from msa_xla import predict

    # run() is what `python -m msa_xla.predict --model_dir=...` calls after parsing its flags.
    assert predict.run(str(tmp_path), None, "test", None, 32) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: no best_model.keras"), err
    assert "Traceback" not in err
