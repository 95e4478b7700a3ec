"""The trainer end to end: each model learns and writes complete results (the default model in a
process of its own: one trace and one XLA compilation over three epochs); N replicas (Mirrored
over 2 logical CPUs, 2 MultiWorker processes) == 1 replica; bad flags."""
import glob
import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from msa_xla.data.integrity import CorruptRecordsWarning
from msa_xla.metrics import METRIC_KEYS
from msa_xla.runtime import allocator
from msa_xla.trainer.config import TrainConfig
from tests.train_helpers import (
    TINY,
    all_ended,
    finish_all,
    main_in_process,
    make_tiny_dataset,
    model_weights,
    results,
    run_train,
    served,
    start_cluster,
    without_xla_cache,
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(autouse=True)
def _legacy_rng_after():
    yield
    keras.backend.experimental.disable_tf_random_generator()  # run() enables it process-wide


def tiny_config(data_dir, workdir, **overrides):
    values = dict(data_dir=data_dir, workdir=str(workdir), model_dim=16, num_heads=2, ff_dim=32,
                  n_layers_mod=1, n_layers_fuse=1, batch_size=8, learning_rate=3e-3, epochs=3,
                  verbose=0, checkpoint_every=0)
    values.update(overrides)
    return TrainConfig(**values)


def _assert_learned_and_complete(workdir, model, jit):
    """results.json of a 3-epoch run is complete, the loss fell, and the SavedModel's serving
    signature predicts what the .keras model predicts."""
    res = results(workdir)
    seed_run = res["per_seed"][0]
    loss = seed_run["history"]["loss"]
    assert len(loss) == 3 and loss[-1] < loss[0], loss
    assert set(seed_run["test"]) == set(METRIC_KEYS)
    assert set(res["summary"]) == set(METRIC_KEYS)
    assert res["config"]["model"] == model and res["data_metadata"]["splits"]["test"]["count"] == 24
    assert res["samples_per_second"] > 0 and res["hardware"]["tensorflow"]
    assert res["strategy"] == "OneDeviceStrategy" and res["jit"] == jit
    assert os.path.isdir(workdir / "seed_1111" / "tensorboard" / "train")
    best = keras.models.load_model(res["best_model"]["keras"])
    inputs = best.example_inputs(3)
    rng = np.random.default_rng(0)
    inputs = tuple(tf.constant(rng.normal(size=x.shape), x.dtype) if x.dtype.is_floating else x
                   for x in inputs[:3]) + (tf.sequence_mask([8, 5, 1], 8),) + inputs[4:]
    np.testing.assert_allclose(served(res["best_model"]["savedmodel"], inputs),
                               best(inputs, training=False), rtol=1e-5, atol=1e-6)
    return seed_run


def _xla_modules(dump_dir, name):
    """Distinct XLA compilations whose module name contains `name`, from an XLA dump folder."""
    return {f.split(".")[0] for f in os.listdir(dump_dir)
            if name in f and f.endswith("after_optimizations.txt") and "__compute_module" not in f}


@pytest.mark.slow
def test_default_model_learns_with_its_train_step_traced_and_xla_compiled_once(data_dir,
                                                                               tmp_path):
    # `python -m msa_xla.train` as a user runs it, the default model with XLA (whole step).
    # One trace is not enough: a jit-compiled attention unit nested in the jit train step once
    # made XLA treat every argument as a constant and recompile the step on every call, with
    # the tracing count still 1. XLA's own dump counts compilations.
    dump = tmp_path / "xla"
    env = without_xla_cache(os.environ)  # an executable loaded from the cache is not dumped
    env.pop(allocator.VARIABLE, None)  # the trainer's own choice of CPU allocator
    env["XLA_FLAGS"] = " ".join(filter(None, [
        env.get("XLA_FLAGS"), f"--xla_dump_to={dump}", "--xla_dump_hlo_module_re=.*run_step.*"]))
    code, _, err = run_train(TINY + [f"--data_dir={data_dir}", f"--workdir={tmp_path / 'run'}",
                                     "--epochs=3", "--checkpoint_every=0", "--dropout_rate=0.1"],
                             env=env)
    assert code == 0, err
    seed_run = _assert_learned_and_complete(tmp_path / "run", "seqlevel", "whole_step")
    # Keras names both the train and the eval step `run_step`: one compilation each, for
    # 24 train steps, 3 validations and the test evaluation (padded batches keep shapes static).
    assert len(_xla_modules(dump, "run_step")) == 2, sorted(_xla_modules(dump, "run_step"))
    assert len(seed_run["history"]["val_MAE"]) == 3
    assert seed_run["train_function_traces"] == 1
    # Pooled memory (runtime/allocator.py): a plain malloc page-faults every step's buffers in.
    assert results(tmp_path / "run")["hardware"]["cpu_allocator"] == "bfc"


@pytest.mark.slow
# improved with XLA (no other test trains it through the trainer); msa and balanced without:
# the predict and steps-per-execution tests train them through the trainer with XLA.
@pytest.mark.parametrize("model, jit", [("msa", "kernels_only"), ("improved", "whole_step"),
                                        ("balanced", "kernels_only")])
def test_each_other_model_learns_and_writes_complete_results(data_dir, tmp_path, model, jit):
    from msa_xla.trainer.main import run

    jit_compile = "auto" if jit == "whole_step" else "false"
    assert run(tiny_config(data_dir, tmp_path / "run", model=model,
                           jit_compile=jit_compile)) == 0
    _assert_learned_and_complete(tmp_path / "run", model, jit)


@pytest.mark.slow
def test_two_seeds_give_mean_and_std_and_export_the_best_seeds_model(data_dir, tmp_path):
    from msa_xla.trainer.main import run

    # The aggregation over seeds is under test, not XLA: no compile (jit_compile=false).
    assert run(tiny_config(data_dir, tmp_path / "run", epochs=1, seeds=(1, 2),
                           jit_compile="false")) == 0
    res = results(tmp_path / "run")
    maes = [r["test"]["MAE"] for r in res["per_seed"]]
    assert res["summary"]["MAE"]["mean"] == pytest.approx(np.mean(maes))
    assert res["summary"]["MAE"]["std"] == pytest.approx(np.std(maes))
    # The best seed (lowest validation MAE) is exported, as .keras and as the SavedModel (the
    # model kept in memory, whichever seed trained last).
    best = min(res["per_seed"], key=lambda run: run["best_val_MAE"])
    assert res["best_model"]["seed"] == best["seed"]
    expected = keras.models.load_model(best["model_path"])
    exported = keras.models.load_model(res["best_model"]["keras"])
    inputs = expected.example_inputs(2)
    want = expected(inputs, training=False)
    np.testing.assert_array_equal(exported(inputs, training=False), want)
    np.testing.assert_allclose(served(res["best_model"]["savedmodel"], inputs), want,
                               rtol=1e-5, atol=1e-6)
    other = next(run for run in res["per_seed"] if run is not best)
    assert not np.allclose(keras.models.load_model(other["model_path"])(inputs), want)


# ---- N replicas == 1 replica --------------------------------------------------------------------
# Tolerance: the replicas' gradients are summed by an all-reduce in another order than the one
# replica's batch reduction, so each step differs by float32 rounding (~1e-7 relative); Adam
# divides by sqrt(v), which amplifies that for near-zero gradients, and 16 steps at lr 3e-3
# compound it. Measured max |diff| ~2e-5 with lr 1e-2; we allow atol 1e-4 on weights of size ~0.1-1,
# far below one Adam step (3e-3): a wrong reduction (mean of sums, a replica's batch lost or seen
# twice) moves weights by whole steps and fails.
ATOL = 1e-4
EQUIV = TINY + ["--epochs=2", "--dropout_rate=0", "--checkpoint_every=0", "--seeds=7"]


def equiv_config(data_dir, workdir, **overrides):
    """EQUIV as a TrainConfig, for the runs made in this process."""
    return tiny_config(data_dir, workdir, epochs=2, dropout_rate=0.0, seeds=(7,), **overrides)


def _assert_same_weights(actual, expected):
    assert len(actual) == len(expected)
    worst = max(float(np.max(np.abs(a - e))) for a, e in zip(actual, expected))
    assert worst < ATOL, worst


@pytest.mark.slow
@pytest.mark.multiworker
def test_two_mirrored_cpus_and_two_worker_processes_each_equal_one_replica(data_dir, tmp_path):
    # One test for both: they compare with the same one-replica run, trained once.
    from msa_xla.trainer.main import run

    def weights(workdir):
        return model_weights(workdir / "seed_7" / "model.keras")

    multi_worker = tmp_path / "multi_worker"
    processes, _ = start_cluster(EQUIV + [f"--data_dir={data_dir}", f"--workdir={multi_worker}",
                                          "--strategy=multi_worker"], 2, all_ended)
    outputs = finish_all(processes)
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 0, err

    one, mirrored = tmp_path / "one", tmp_path / "mirrored"
    # The reference without XLA (its plan is not under test; the replicas' runs use XLA).
    assert run(equiv_config(data_dir, one, strategy="cpu", jit_compile="false")) == 0
    # In this process: conftest.py made its two logical CPUs.
    assert run(equiv_config(data_dir, mirrored, strategy="mirrored"), cpu_replicas=2) == 0

    for workdir in (mirrored, multi_worker):
        res = results(workdir)
        assert res["replicas"] == 2 and res["jit"] == "split_step", workdir
        _assert_same_weights(weights(workdir), weights(one))


# ---- bad flags: one line, exit code 2 -----------------------------------------------------------
BAD_FLAGS = {
    "model": (["--model=transformer"], "model"),
    "batch": (["--batch_size=7", "--strategy=mirrored", "--cpu_replicas=2"], "not divisible"),
    "data": (["--data_dir=/nonexistent/msa"], "/nonexistent/msa"),
    "tpu": (["--tpu=local"], "no TPU"),
    "heads": (["--model_dim=30", "--num_heads=4"], "30"),
}


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flags_end_with_one_line_and_exit_code_2(data_dir, tmp_path, capsys, case):
    args, words = BAD_FLAGS[case]
    # The tiny dataset unless the case names its own (later flags win): the model-dim case
    # fails when the model is built, after the data's metadata is read.
    code, _, err = main_in_process([f"--data_dir={data_dir}", *args,
                                    f"--workdir={tmp_path / 'run'}"], capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(lines) == 1 and words in lines[0], err
    assert "Traceback" not in err


@pytest.mark.slow
def test_bad_flag_in_a_fresh_process_is_one_line_exit_code_2_no_traceback(tmp_path):
    # The process contract, once: stderr has one `error:` line and no traceback, the exit code
    # is 2. This case also splits the CPU into logical devices before TF starts, which only a
    # fresh process does (in this one conftest.py already did).
    args, words = BAD_FLAGS["batch"]
    code, _, err = run_train(args + [f"--workdir={tmp_path / 'run'}"], timeout=120)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(lines) == 1 and words in lines[0], err
    assert "Traceback" not in err


@pytest.mark.slow
def test_corrupt_shard_stops_naming_the_file_or_is_skipped_with_a_count(tmp_path, capsys):
    # 17 valid/test clips = 3 batches of 8; one bad record each leaves 16 = 2 batches, so the
    # trainer must count the usable records (a third batch would run the input out of data).
    data = make_tiny_dataset(tmp_path / "data", sizes=(64, 17, 17))
    shards = [sorted(glob.glob(os.path.join(data, f"{split}-*.tfrecord")))[0]
              for split in ("train", "valid", "test")]
    for shard in shards:
        with open(shard, "r+b") as f:  # flip a byte inside the first record's payload
            f.seek(40)
            byte = f.read(1)
            f.seek(40)
            f.write(bytes([byte[0] ^ 0xFF]))
    args = TINY + [f"--data_dir={data}", "--epochs=2", "--jit_compile=false"]  # data under test
    code, _, err = main_in_process(args + [f"--workdir={tmp_path / 'strict'}"], capsys)
    assert code == 2 and os.path.basename(shards[0]) in err and "Traceback" not in err, err
    with pytest.warns(CorruptRecordsWarning) as warned:  # a process prints them on stderr
        code, out, err = main_in_process(
            args + ["--skip_corrupt", f"--workdir={tmp_path / 'skip'}"], capsys)
    assert code == 0, err
    skipped = "\n".join(str(w.message) for w in warned)
    for shard in shards:
        assert f"{os.path.basename(shard)}: skipped 1 of 64" in skipped or \
            f"{os.path.basename(shard)}: skipped 1 of 17" in skipped, skipped
    assert "ran out of data" not in err + out
    res = results(tmp_path / "skip")
    assert res["data_metadata"]["skipped_corrupt"] == {"train": 1, "valid": 1, "test": 1}
    assert {s: res["data_metadata"]["splits"][s]["count"] for s in ("train", "valid", "test")} == \
        {"train": 63, "valid": 16, "test": 16}
    assert len(res["per_seed"][0]["history"]["val_MAE"]) == 2  # validated after every epoch


# ---- --clipnorm -----------------------------------------------------------------------------------
def _adam_steps(optimizer, gradients):
    import tensorflow as tf

    variable = tf.Variable([1.0, -1.0])
    for gradient in gradients:
        optimizer.apply_gradients([(tf.constant(gradient), variable)])
    return variable.numpy()


def test_clipnorm_flag_reaches_the_optimizer_and_clips_each_gradient(data_dir):
    from msa_xla.cli import absl_flags_parser
    from msa_xla.data import load_metadata
    from msa_xla.runtime.distribute import get_strategy
    from msa_xla.trainer.loop import _build_model
    from msa_xla.trainer.main import FLAGS
    from msa_xla.trainer.step import make_optimizer

    try:
        absl_flags_parser(FLAGS)(["msa_xla.train", "--clipnorm=0.5"])
        cfg = TrainConfig.from_flags(FLAGS)
    finally:
        FLAGS.unparse_flags()
    cfg.data_dir, cfg.model_dim, cfg.ff_dim, cfg.n_layers_mod = data_dir, 16, 32, 1
    model, _, _ = _build_model(cfg, load_metadata(data_dir), get_strategy("cpu", None), seed=1)
    assert model.optimizer.clipnorm == 0.5

    # Adam's first step is ~lr * sign(g) whatever |g|, so one step cannot show clipping; two can:
    # a huge first gradient dominates the moments unless it was clipped to norm 1 first.
    huge, small = [3000.0, 4000.0], [0.3, -0.4]  # norms 5000 and 0.5
    clipped = _adam_steps(make_optimizer(0.1, 1.0), [huge, small])
    by_hand = _adam_steps(make_optimizer(0.1, 0.0), [[0.6, 0.8], small])  # huge / 5000; small < 1
    unclipped = _adam_steps(make_optimizer(0.1, 0.0), [huge, small])
    np.testing.assert_allclose(clipped, by_hand, rtol=1e-6)
    assert np.max(np.abs(clipped - unclipped)) > 1e-2, (clipped, unclipped)
