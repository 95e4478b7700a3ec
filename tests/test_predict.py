"""predict.py: a CSV with every clip's id, prediction and label, in source order."""
import csv
import subprocess
import sys

import pytest

from msa_xla.trainer.config import TrainConfig
from tests.train_helpers import make_tiny_dataset

pytestmark = pytest.mark.slow  # trains through the trainer, then runs predict as a process


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import tf_keras as keras

    from msa_xla.trainer.main import run

    data_dir = make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny", sizes=(32, 8, 13))
    workdir = tmp_path_factory.mktemp("run") / "run"
    cfg = TrainConfig(data_dir=data_dir, workdir=str(workdir), model="msa", model_dim=16,
                      num_heads=2, ff_dim=32, n_layers_mod=1, n_layers_fuse=1, batch_size=8,
                      epochs=1, verbose=0)
    try:
        assert run(cfg) == 0
    finally:
        keras.backend.experimental.disable_tf_random_generator()
    return data_dir, workdir


def test_predict_writes_every_test_clip(trained, tmp_path):
    data_dir, workdir = trained
    output = tmp_path / "pred.csv"
    done = subprocess.run([sys.executable, "-m", "msa_xla.predict", f"--model_dir={workdir}",
                           f"--data_dir={data_dir}", "--split=test", f"--output={output}"],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(output.open()))
    assert len(rows) == 13  # 13 clips: the last partial batch is predicted too
    assert [r["id"] for r in rows] == [f"synthtest_{i:05d}" for i in range(13)]
    assert all(abs(float(r["prediction"])) < 10 for r in rows)


def test_predict_missing_model_is_one_line_exit_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "msa_xla.predict", f"--model_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: no best_model.keras")
