"""Predict a split with a trained model: a CSV of clip id, prediction, label.

    python -m msa_xla.predict --model_dir=runs/seqlevel-20250101-120000 --data_dir=tfrecords/mosi \\
        --split=test [--output=predictions.csv]

`--model_dir` is a training workdir (its best_model.keras is used), a seed folder (model.keras), or
a `.keras` file. Clips come in the dataset's source order; every clip is predicted (the last
batch is padded to a static shape and the padding dropped). Exit code 2 with one `error:` line
for a missing model or data. Model, data and CSV may each be local or remote (gs://...).
"""

from __future__ import annotations

import csv
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from msa_xla import cli  # noqa: E402
from msa_xla.errors import UserError  # noqa: E402
from msa_xla.runtime import storage  # noqa: E402
from msa_xla.runtime.allocator import prefer_pooled_cpu_allocator  # noqa: E402

prefer_pooled_cpu_allocator()  # before TF creates its devices (runtime/allocator.py: why)

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The CLI's flags; defined only when run as a program, so importing this module (for
    `predict_split` or `run`) registers nothing in absl's global flags, where msa_xla.train defines
    flags of the same names."""
    flags.DEFINE_string("model_dir", None, "Training workdir, seed folder, or .keras file.")
    flags.DEFINE_string("data_dir", None,
                        "Dataset folder (default: the built-in synthetic dataset).")
    flags.DEFINE_enum("split", "test", ["train", "valid", "test"], "Split to predict.")
    flags.DEFINE_string("output", None, "CSV path (default <model_dir>/predictions_<split>.csv).")
    flags.DEFINE_integer("batch_size", 32, "Batch size for inference.")


def find_model_file(model_dir: str) -> str:
    """The .keras file a --model_dir names (see module docstring)."""
    if model_dir.endswith(".keras") and storage.isfile(model_dir):
        return model_dir
    for name in ("best_model.keras", "model.keras"):
        path = storage.join(model_dir, name)
        if storage.isfile(path):
            return path
    raise UserError(f"no best_model.keras or model.keras in {model_dir}")


def clip_ids(data_dir: str, split: str) -> list[str]:
    """Clip ids of `split` in the order make_dataset(shuffle=False) yields them."""
    import tensorflow as tf

    from msa_xla.data import load_metadata
    from msa_xla.data.schema import ID_KEY

    meta = load_metadata(data_dir)
    files = [storage.join(data_dir, s["file"]) for s in meta["splits"][split]["shards"]]
    spec = {ID_KEY: tf.io.FixedLenFeature([], tf.string)}
    ids = tf.data.TFRecordDataset(files).batch(1024).map(
        lambda records: tf.io.parse_example(records, spec)[ID_KEY])
    return [i.decode() for batch in ids.as_numpy_iterator() for i in batch]


def predict_split(model, data_dir: str, split: str, batch_size: int = 32):
    """Returns (ids, predictions, labels) over every clip of the split, in source order."""
    import numpy as np

    from msa_xla.data import DataError, make_dataset

    text_input = getattr(model, "text_input", "features")
    dataset = make_dataset(data_dir, split, batch_size, shuffle=False, drop_remainder=False,
                           text_input=text_input)
    preds, labels = [], []
    for inputs, label in dataset:
        preds.append(model(inputs, training=False).numpy().reshape(-1))
        labels.append(label.numpy().reshape(-1))
    ids = clip_ids(data_dir, split)
    preds, labels = np.concatenate(preds), np.concatenate(labels)
    if len(ids) != len(preds):
        raise DataError(f"{data_dir}: {len(ids)} clip ids but {len(preds)} predictions")
    return ids, preds, labels


def write_csv(path: str, ids, preds, labels) -> None:
    storage.makedirs(storage.dirname(storage.absolute(path)))
    with storage.open_file(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "prediction", "label"])
        for clip, pred, label in zip(ids, preds, labels):
            writer.writerow([clip, f"{pred:.6f}", f"{label:.6f}"])


def run(model_dir: str, data_dir: str | None = None, split: str = "test",
        output: str | None = None, batch_size: int = 32) -> int:
    """Predict `split` with the model `model_dir` names into a CSV (default
    <model_dir>/predictions_<split>.csv); returns the exit code (2 after one `error:` line)."""
    from msa_xla.data import ensure_builtin_dataset

    try:
        if not model_dir:
            raise UserError("--model_dir is required")
        model_file = find_model_file(model_dir)
        data_dir = data_dir or ensure_builtin_dataset()
        from msa_xla.data import load_metadata

        load_metadata(data_dir)  # a clear DataError before loading the model
        import tf_keras as keras

        import msa_xla.models  # noqa: F401  registers the model classes for load_model
        from msa_xla.metrics import msa_metrics

        with storage.as_oserror(model_file):  # a remote file is read through TF's filesystems
            model = keras.models.load_model(model_file)
        ids, preds, labels = predict_split(model, data_dir, split, batch_size)
        out_dir = model_dir if storage.isdir(model_dir) else storage.dirname(model_file)
        output = output or storage.join(out_dir, f"predictions_{split}.csv")
        write_csv(output, ids, preds, labels)
    except (UserError, OSError) as error:  # OSError: an unreadable model or data file
        return cli.report_error(error)
    metrics = msa_metrics(labels, preds)
    print(f"{len(ids)} predictions -> {output}; MAE {metrics['MAE']:.4f}, "
          f"Non0_acc_2 {100 * metrics['Non0_acc_2']:.2f}%", flush=True)
    return 0


def main(argv) -> int:
    return run(FLAGS.model_dir, FLAGS.data_dir, FLAGS.split, FLAGS.output, FLAGS.batch_size)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.absl_flags_parser(FLAGS))
