"""Checkpoints: resume after SIGKILL matches an uninterrupted run; SIGTERM saves and exits 143;
a locked workdir and a checkpoint from another config are refused with one line."""
import glob
import os
import random
import re
import signal
import time

import numpy as np
import pytest
import tf_keras as keras

from msa_xla.models import MODELS
from msa_xla.trainer.checkpointing import (
    CheckpointError,
    RunCheckpoint,
    WorkdirLock,
    rng_state_variables,
    sync_from_chief,
)
from tests.train_helpers import (
    TINY,
    finish_all,
    free_ports,
    make_tiny_dataset,
    model_weights,
    results,
    run_train,
    start_workers,
)

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


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("whole") / "run"
    code, _, err = run_train(RESUME + [f"--data_dir={data_dir}", f"--workdir={workdir}"])
    assert code == 0, err
    return model_weights(os.path.join(workdir, "seed_3", "model.keras"))


def _latest_step(workdir):
    """The step of the newest complete checkpoint (the manager's `checkpoint` file), or 0."""
    try:
        with open(os.path.join(workdir, "seed_3", "checkpoints", "checkpoint")) as f:
            return int(re.search(r'model_checkpoint_path: "ckpt-(\d+)"', f.read()).group(1))
    except (OSError, AttributeError):  # not written yet, or caught mid-replace
        return 0


# Where checkpoints land in RESUME: every 5 steps and at the epoch ends (12, 24, 36).
CHECKPOINT_STEPS = sorted({*range(5, 36, 5), 12, 24})


@pytest.mark.slow
def test_three_sigkills_at_random_steps_then_resume_match_uninterrupted_run(
        data_dir, tmp_path, uninterrupted):
    rng = random.Random(2026)  # seeded: the same kill points on every run of the suite
    workdir = str(tmp_path / "run")
    args = RESUME + [f"--data_dir={data_dir}", f"--workdir={workdir}"]
    kills = []
    for _ in range(3):
        before = _latest_step(workdir)
        target = rng.choice([s for s in CHECKPOINT_STEPS if s > before][:3])
        process = run_train(args, wait=False)
        deadline = time.time() + 180
        while _latest_step(workdir) < target:
            assert process.poll() is None, process.communicate()[1]
            assert time.time() < deadline, f"no checkpoint at step {target}"
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.04))  # about 0-2 steps on: the kill lands mid-interval
        assert process.poll() is None, "the run finished before the kill"
        process.send_signal(signal.SIGKILL)
        out, _ = process.communicate(timeout=30)
        assert process.returncode == -signal.SIGKILL
        resumed = re.search(r"resumed from step (\d+)", out)
        # Each rerun picks up where the previous kill left its last checkpoint.
        assert (int(resumed.group(1)) if resumed else 0) == before, (out, before)
        kills.append(_latest_step(workdir))
    assert kills == sorted(kills) and kills[-1] < 36, kills
    code, out, err = run_train(args)
    assert code == 0, err
    assert f"resumed from step {kills[-1]} " in out, (out, kills)
    resumed = model_weights(os.path.join(workdir, "seed_3", "model.keras"))
    assert results(workdir)["per_seed"][0]["steps"] == 36
    for a, b in zip(resumed, uninterrupted):
        np.testing.assert_array_equal(a, b)  # --deterministic: bit-identical


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.multiworker
def test_a_killed_worker_ends_the_survivor_with_one_line_and_both_resume(data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    args = RESUME + [f"--data_dir={data_dir}", f"--workdir={workdir}", "--strategy=multi_worker"]
    ports = free_ports(2)
    workers = start_workers(args, ports)
    try:
        _wait_for(os.path.join(workdir, "seed_3", "checkpoints", "checkpoint"), workers[0])
        workers[1].send_signal(signal.SIGKILL)  # the non-chief: the chief must notice
        killed_at = time.time()
        _, err = workers[0].communicate(timeout=120)  # a hang fails here
        noticed_after = time.time() - killed_at
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
            worker.communicate()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert workers[0].returncode == 4, err
    assert len(errors) == 1 and "lost contact with another worker" in errors[0], err
    assert "Traceback" not in err
    print(f"the survivor stopped {noticed_after:.1f} s after the kill")  # shown with -s
    assert noticed_after < 60, noticed_after  # TF's heartbeats
    saved = _latest_step(workdir)
    assert 0 < saved < 36, saved

    # The same command on both workers (same ports): they resume from the shared checkpoint.
    workers = start_workers(args, ports)
    outputs = finish_all(workers)
    for worker, (_, err) in zip(workers, outputs):
        assert worker.returncode == 0, err
    assert f"resumed from step {saved} " in outputs[0][0], outputs[0][0]
    assert results(workdir)["per_seed"][0]["steps"] == 36


def test_second_run_on_a_locked_workdir_is_refused(tmp_path):
    lock = WorkdirLock(str(tmp_path)).acquire()
    try:
        with pytest.raises(CheckpointError, match=f"in use by another run \\(pid {os.getpid()}\\)"):
            WorkdirLock(str(tmp_path)).acquire()
    finally:
        lock.release()
    WorkdirLock(str(tmp_path)).acquire().release()  # free again once released


@pytest.mark.slow
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


def test_sync_from_chief_replaces_a_workers_stale_copy(tmp_path):
    chief, own = tmp_path / "seed_1", tmp_path / ".worker-1" / "seed_1"
    (chief / "checkpoints").mkdir(parents=True)
    (chief / "checkpoints" / "checkpoint").write_text('model_checkpoint_path: "ckpt-10"\n')
    (chief / "best").mkdir()
    (chief / "best" / "weights.index").write_text("best of epoch 2")
    (own / "checkpoints").mkdir(parents=True)
    (own / "checkpoints" / "ckpt-15.index").write_text("half-written")  # the dead worker's
    (own / "result.json").write_text("{}")  # the chief has none: the seed is not finished
    sync_from_chief(str(chief), str(own))
    assert sorted(p.name for p in (own / "checkpoints").iterdir()) == ["checkpoint"]
    assert (own / "checkpoints" / "checkpoint").read_text() == 'model_checkpoint_path: "ckpt-10"\n'
    assert (own / "best" / "weights.index").read_text() == "best of epoch 2"
    assert not (own / "result.json").exists()
