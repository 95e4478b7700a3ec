"""Checkpoints: resume after SIGKILL matches an uninterrupted run; SIGTERM saves and exits 143;
a locked workdir and a checkpoint from another config are refused with one line."""
import glob
import os
import re
import signal
import time

import numpy as np
import pytest
import tf_keras as keras

from msa_xla.checkpointing import CheckpointError, RunCheckpoint, WorkdirLock, rng_state_variables
from msa_xla.models import MODELS
from tests.train_helpers import TINY, make_tiny_dataset, model_weights, run_train

# 96 clips / batch 8 = 12 steps per epoch, 3 epochs = 36 steps; dropout on (its RNG state must be
# restored too), checkpoints every 5 steps so the kill lands mid-epoch.
RESUME = TINY + ["--epochs=3", "--dropout_rate=0.1", "--checkpoint_every=5", "--deterministic",
                 "--seeds=3"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny", sizes=(96, 16, 16))


def _wait_for(pattern, process, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = glob.glob(pattern)
        if found:
            return found
        assert process.poll() is None, process.communicate()[1]
        time.sleep(0.01)
    raise AssertionError(f"{pattern} did not appear")


def _steps_saved(workdir):
    files = glob.glob(os.path.join(workdir, "seed_3", "checkpoints", "trainer-*.json"))
    return sorted(int(f.rsplit("-", 1)[1].split(".")[0]) for f in files)


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("whole") / "run"
    code, _, err = run_train(RESUME + [f"--data_dir={data_dir}", f"--workdir={workdir}"])
    assert code == 0, err
    return model_weights(os.path.join(workdir, "seed_3", "model.keras"))


def test_resume_after_sigkill_matches_uninterrupted_run(data_dir, tmp_path, uninterrupted):
    workdir = str(tmp_path / "run")
    args = RESUME + [f"--data_dir={data_dir}", f"--workdir={workdir}"]
    process = run_train(args, wait=False)
    # The manager's `checkpoint` file is written last: a checkpoint is then complete.
    _wait_for(os.path.join(workdir, "seed_3", "checkpoints", "checkpoint"), process)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    saved = _steps_saved(workdir)
    assert saved and max(saved) < 36, saved  # killed before the end
    code, out, err = run_train(args)
    assert code == 0, err
    resumed_at = int(re.search(r"resumed from step (\d+)", out).group(1))
    assert resumed_at in saved and 0 < resumed_at < 36, (resumed_at, saved)
    resumed = model_weights(os.path.join(workdir, "seed_3", "model.keras"))
    for a, b in zip(resumed, uninterrupted):
        np.testing.assert_array_equal(a, b)  # --deterministic: bit-identical


def test_sigterm_saves_a_checkpoint_and_exits_143_then_resumes(data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    args = RESUME + ["--epochs=1", f"--data_dir={data_dir}", f"--workdir={workdir}"]
    process = run_train(args, wait=False)
    _wait_for(os.path.join(workdir, "seed_3", "checkpoints", "checkpoint"), process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    if process.returncode == 0:
        pytest.skip("the run finished before SIGTERM arrived")
    assert process.returncode == 143, err
    assert "preempted" in out
    code, _, err = run_train(args)
    assert code == 0, err


def test_second_run_on_a_locked_workdir_is_refused(tmp_path):
    lock = WorkdirLock(str(tmp_path)).acquire()
    try:
        with pytest.raises(CheckpointError, match=f"in use by another run \\(pid {os.getpid()}\\)"):
            WorkdirLock(str(tmp_path)).acquire()
    finally:
        lock.release()
    WorkdirLock(str(tmp_path)).acquire().release()  # free again once released


def test_locked_workdir_through_the_cli(data_dir, tmp_path):
    lock = WorkdirLock(str(tmp_path / "run")).acquire()
    try:
        code, _, err = run_train(TINY + [f"--data_dir={data_dir}", f"--workdir={tmp_path / 'run'}"],
                                 timeout=120)
    finally:
        lock.release()
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: workdir"), err


def _tiny_model(model_dim=16):
    keras.backend.experimental.enable_tf_random_generator()
    try:
        model = MODELS["seqlevel"](8, 6, 5, 4, model_dim=model_dim, num_heads=2, ff_dim=32,
                                   n_layers_mod=1, n_layers_fuse=1, dropout_rate=0.1)
    finally:
        keras.backend.experimental.disable_tf_random_generator()
    model(model.example_inputs(2))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mae")
    model.optimizer.build(model.trainable_variables)
    return model


def test_checkpoint_from_another_config_is_refused_with_expected_and_found(tmp_path):
    directory = str(tmp_path / "checkpoints")
    RunCheckpoint(directory, _tiny_model(), {"model": "seqlevel", "model_dim": 16}).save({"x": 1})
    other = RunCheckpoint(directory, _tiny_model(32), {"model": "msa", "model_dim": 32})
    with pytest.raises(CheckpointError) as error:
        other.restore_latest()
    message = str(error.value)
    assert "model: expected 'msa', found 'seqlevel'" in message
    assert "model_dim: expected 32, found 16" in message and "\n" not in message


def test_checkpoint_round_trip_restores_weights_optimizer_and_dropout_rng(tmp_path):
    model = _tiny_model()
    rng = rng_state_variables(model)
    assert rng, "dropout layers should use tf.random.Generator"
    directory = str(tmp_path / "checkpoints")
    model.optimizer.iterations.assign(7)
    RunCheckpoint(directory, model, {"a": 1}).save({"epochs_done": 0})
    saved = [v.numpy().copy() for v in model.weights + rng]
    fresh = _tiny_model()
    state = RunCheckpoint(directory, fresh, {"a": 1}).restore_latest()
    assert state["step"] == 7 and int(fresh.optimizer.iterations.numpy()) == 7
    for a, b in zip(saved, [v.numpy() for v in fresh.weights + rng_state_variables(fresh)]):
        np.testing.assert_array_equal(a, b)
