"""Checkpoints: resume after SIGKILL matches an uninterrupted run; SIGTERM saves and exits 143;
a locked workdir and a checkpoint from another config are refused with one line."""
import glob
import json
import os
import random
import re
import signal
import threading
import time

import numpy as np
import pytest
import tf_keras as keras

from msa_xla.cli import EXIT_PREEMPTED
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
    all_ended,
    finish_all,
    main_in_process,
    make_tiny_dataset,
    model_weights,
    output_of,
    results,
    run_train,
    start_cluster,
)

# 192 clips / batch 8 = 24 steps per epoch, 3 epochs = 72 steps; dropout on (its RNG state must be
# restored too), checkpoints every 10 steps so the kill lands mid-epoch. Between two checkpoints
# run 9 plain steps (~90 ms at ~10 ms a step), longer than the progress bar's 50 ms redraw
# interval: the bar shows a step past the newest checkpoint before the next one is written (with
# 4 steps between checkpoints it often did not, and the SIGKILL test's run ended unkilled).
STEPS_PER_EPOCH, TOTAL_STEPS = 24, 72
RESUME = TINY + ["--epochs=3", "--dropout_rate=0.1", "--checkpoint_every=10", "--deterministic",
                 "--seeds=3"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny", sizes=(192, 16, 16))


def _wait_for(pattern, process, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = glob.glob(pattern)
        if found:
            return found
        assert process.poll() is None, output_of(process)[1]
        time.sleep(0.01)
    raise AssertionError(f"{pattern} did not appear")


def _train_here(args, capsys=None):
    """`python -m msa_xla.train ARGS` in this process: (exit code, stdout, stderr). What a
    --deterministic run switches on for the whole process is switched off again."""
    # Not in tf.config's public API (TF 2.21): the function enable_op_determinism's docs pair it with.
    from tensorflow.python.framework.config import disable_op_determinism

    try:
        return main_in_process(args, capsys)
    finally:
        disable_op_determinism()
        keras.backend.experimental.disable_tf_random_generator()


def _latest_step(workdir):
    """The step of the newest complete checkpoint (the manager's `checkpoint` file), or 0."""
    try:
        with open(os.path.join(workdir, "seed_3", "checkpoints", "checkpoint")) as f:
            return int(re.search(r'model_checkpoint_path: "ckpt-(\d+)"', f.read()).group(1))
    except (OSError, AttributeError):  # not written yet, or caught mid-replace
        return 0


# Where checkpoints land in RESUME: every 10 steps and at the epoch ends (24, 48, 72).
CHECKPOINT_STEPS = sorted({*range(10, TOTAL_STEPS, 10), STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH})
# --verbose=1: Keras redraws "  7/24 [====>...] - ..." with \b and \r (one line per epoch, as it
# counts `posix` in sys.modules as a terminal); "Epoch 2/3" starts each epoch.
PROGRESS = re.compile(rf"Epoch (\d+)/3|(\d+)/{STEPS_PER_EPOCH} \[")


def _follow_stdout(process):
    """A list that a thread fills with the process's stdout as it comes (raw reads: the progress
    bar ends no line until the epoch ends)."""
    chunks = []

    def read():
        while True:
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                return
            chunks.append(chunk.decode(errors="replace"))

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return chunks, thread


def _steps_done(chunks):
    """The last global train step the progress bar showed (a lower bound of the steps done: it
    redraws at most every 50 ms, after the checkpoint callback of that step), or 0."""
    epoch, step = 1, 0
    for match in PROGRESS.finditer("".join(chunks)):
        if match.group(1):
            epoch = int(match.group(1))
        else:
            step = max(step, (epoch - 1) * STEPS_PER_EPOCH + int(match.group(2)))
    return step


def _uninterrupted_weights(data_dir, tmp_path):
    """The final weights of RESUME run here without interruption."""
    code, _, _ = _train_here(RESUME + [f"--data_dir={data_dir}", f"--workdir={tmp_path}"])
    assert code == 0
    return model_weights(os.path.join(tmp_path, "seed_3", "model.keras"))


def _run_until(args, ready, rng):
    """Starts `python -m msa_xla.train ARGS --verbose=1` and waits until `ready(steps shown by
    the progress bar)` holds, then a random 0-20 ms: (process, its stdout chunks, reader)."""
    process = run_train(args + ["--verbose=1"], wait=False)
    chunks, reader = _follow_stdout(process)
    deadline = time.time() + 180
    try:
        while not ready(_steps_done(chunks)):
            assert process.poll() is None, process.stderr.read()
            assert time.time() < deadline, f"never ready: {chunks[-3:]}"
            time.sleep(0.003)
        time.sleep(rng.uniform(0, 0.02))
        assert process.poll() is None, "the run finished before the signal"
    except BaseException:
        process.kill()  # no run outlives a failed test
        raise
    return process, chunks, reader


def _resumed_step(out):
    resumed = re.search(r"resumed from step (\d+)", out)
    return int(resumed.group(1)) if resumed else 0


@pytest.mark.slow
def test_two_sigkills_then_a_sigterm_then_the_resume_give_the_uninterrupted_weights(
        data_dir, tmp_path, capsys):
    # One chain of runs on one workdir: two SIGKILLs at random steps, a SIGTERM, the resume.
    rng = random.Random(2026)  # seeded: the same kill points on every run of the suite
    workdir = str(tmp_path / "run")
    args = RESUME + [f"--data_dir={data_dir}", f"--workdir={workdir}"]

    # ---- two SIGKILLs: each rerun resumes from the last checkpoint the kill left -----------------
    kills = []  # (steps the killed run had done at least, its last checkpoint)
    for _ in range(2):
        before = _latest_step(workdir)
        # One of the next two, at most 30: each kill lands within a step or two of its target
        # (so at most one checkpoint later, 40), leaving epoch 3 (48-72) to the SIGTERM below.
        target = rng.choice([s for s in CHECKPOINT_STEPS if before < s <= 30][:2])
        # Past the target checkpoint, then until the progress bar shows a step after the newest
        # checkpoint: the kill then loses the steps since that checkpoint, which the rerun replays.
        process, chunks, reader = _run_until(
            args, lambda shown, target=target: (_latest_step(workdir) >= target
                                                and shown > _latest_step(workdir)), rng)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        reader.join(timeout=30)
        process.stdout.close()
        process.stderr.close()
        assert process.returncode == -signal.SIGKILL
        assert _resumed_step("".join(chunks)) == before, ("".join(chunks), before)
        kills.append((_steps_done(chunks), _latest_step(workdir)))
    saved = [checkpoint for _, checkpoint in kills]
    assert saved == sorted(saved) and saved[-1] < 2 * STEPS_PER_EPOCH, kills
    # At least one kill lost steps done after its last checkpoint (the rerun trains them again).
    assert any(done > checkpoint for done, checkpoint in kills), kills

    # ---- SIGTERM: saves the step it stopped at, exits 143 ----------------------------------------
    # Without --checkpoint_every only the epoch ends (24, 48, 72) and the SIGTERM save write
    # checkpoints. The signal lands a few steps into epoch 3, far from its last validation: a
    # checkpoint between 48 and 72 can only be the SIGTERM's.
    process, chunks, reader = _run_until(
        args + ["--checkpoint_every=0"], lambda shown: shown > 2 * STEPS_PER_EPOCH + 1, rng)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    reader.join(timeout=30)
    out, err = "".join(chunks), process.stderr.read()
    process.stdout.close()
    process.stderr.close()
    assert process.returncode == EXIT_PREEMPTED, err
    assert _resumed_step(out) == saved[-1], out
    assert "preempted (SIGTERM): checkpoint saved" in out, out
    signalled = _latest_step(workdir)
    assert 2 * STEPS_PER_EPOCH < signalled < TOTAL_STEPS, signalled
    checkpoints = os.path.join(workdir, "seed_3", "checkpoints")
    assert os.path.isfile(os.path.join(checkpoints, f"ckpt-{signalled}.index"))
    with open(os.path.join(checkpoints, f"trainer-{signalled}.json")) as f:
        assert json.load(f)["step"] == signalled
    assert not os.path.exists(os.path.join(workdir, "seed_3", "result.json"))

    # ---- the resume, in this process: bit-identical to the uninterrupted run -------------------
    code, out, err = _train_here(args, capsys)
    assert code == 0, err
    assert f"resumed from step {signalled} " in out, (out, kills, signalled)
    assert results(workdir)["per_seed"][0]["steps"] == TOTAL_STEPS
    resumed = model_weights(os.path.join(workdir, "seed_3", "model.keras"))
    for a, b in zip(resumed, _uninterrupted_weights(data_dir, tmp_path / "uninterrupted")):
        np.testing.assert_array_equal(a, b)  # --deterministic: bit-identical


@pytest.mark.slow
@pytest.mark.multiworker
def test_a_killed_worker_ends_the_survivor_with_one_line_and_both_resume(data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    # One epoch (checkpoints at steps 10, 20, 24); the lost worker is under test, not XLA.
    args = RESUME + [f"--data_dir={data_dir}", f"--workdir={workdir}", "--strategy=multi_worker",
                     "--epochs=1", "--jit_compile=false"]
    checkpoint = os.path.join(workdir, "seed_3", "checkpoints", "checkpoint")
    workers, ports = start_cluster(args, 2, lambda _: os.path.exists(checkpoint))
    try:
        _wait_for(checkpoint, workers[0])
        workers[1].send_signal(signal.SIGKILL)  # the non-chief: the chief must notice
        killed_at = time.time()
        _, err = output_of(workers[0], timeout=120)  # a hang fails here
        noticed_after = time.time() - killed_at
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
            output_of(worker)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert workers[0].returncode == 4, err
    assert len(errors) == 1 and "lost contact with another worker" in errors[0], err
    assert "Traceback" not in err
    print(f"the survivor stopped {noticed_after:.1f} s after the kill")  # shown with -s
    assert noticed_after < 60, noticed_after  # TF's heartbeats
    saved = _latest_step(workdir)
    assert 0 < saved < STEPS_PER_EPOCH, saved

    # The same command on both workers (same ports, unless taken meanwhile): they resume from
    # the shared checkpoint.
    workers, _ = start_cluster(args, 2, all_ended, ports=ports)
    outputs = finish_all(workers)
    for worker, (_, err) in zip(workers, outputs):
        assert worker.returncode == 0, err
    assert f"resumed from step {saved} " in outputs[0][0], outputs[0][0]
    assert results(workdir)["per_seed"][0]["steps"] == STEPS_PER_EPOCH


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


# ---- in-process: callback counters across a resume; a mismatched checkpoint through the CLI ----
@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "small", sizes=(16, 8, 8))


@pytest.fixture
def _legacy_rng_after():
    yield
    keras.backend.experimental.disable_tf_random_generator()  # run() enables it process-wide


class _ScriptedMonitor(keras.callbacks.Callback):
    """Sets each epoch's val_MAE from a script (first in the list: every callback after it sees
    the scripted value); optionally sends this process a SIGTERM at the end of one epoch."""

    def __init__(self, values, sigterm_after_epoch=None):
        super().__init__()
        self.values, self.sigterm_after_epoch = values, sigterm_after_epoch

    def on_epoch_end(self, epoch, logs=None):
        logs["val_MAE"] = self.values[epoch]
        if epoch == self.sigterm_after_epoch:
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler: save, stop, exit 143


def _script_the_monitor(monkeypatch, values, sigterm_after_epoch=None):
    from msa_xla.trainer import callbacks, loop

    def build(*args, **kwargs):
        built, handles = callbacks.build_callbacks(*args, **kwargs)
        return [_ScriptedMonitor(values, sigterm_after_epoch), *built], handles

    monkeypatch.setattr(loop, "build_callbacks", build)


@pytest.mark.slow
def test_early_stopping_and_plateau_counters_survive_a_resume(small_data, tmp_path, monkeypatch,
                                                             _legacy_rng_after):
    from msa_xla.trainer.config import TrainConfig
    from msa_xla.trainer.main import run

    # 2 steps an epoch. val_MAE 1.0 at epoch 1, then 2.0 (never better): uninterrupted, the
    # plateau (patience 3) halves the LR at epoch 4 and early stopping (patience 4) ends the run
    # after epoch 5 = 10 steps. Preempted after epoch 3 (waits 2 and 2) and resumed, the same
    # must happen. Counters restarted from 0 (best = inf) would take 2.0 as a new best at epoch
    # 4, keep the LR and stop 3 epochs later.
    cfg = dict(data_dir=small_data, workdir=str(tmp_path / "run"), model_dim=16, num_heads=2,
               ff_dim=32, n_layers_mod=1, n_layers_fuse=1, batch_size=8, learning_rate=4e-3,
               epochs=20, verbose=0, checkpoint_every=0, seeds=(1,), early_stopping_patience=4,
               lr_plateau_patience=3, lr_plateau_factor=0.5,
               jit_compile="false")  # the callbacks' state is under test, not XLA: no compile
    script = [1.0] + [2.0] * 19
    _script_the_monitor(monkeypatch, script, sigterm_after_epoch=2)
    assert run(TrainConfig(**cfg)) == EXIT_PREEMPTED
    checkpoints = tmp_path / "run" / "seed_1" / "checkpoints"
    state = json.loads((checkpoints / "trainer-7.json").read_text())  # 3 epochs + 1 step
    assert state["callbacks"]["early_stopping"] == {"best": 1.0, "best_epoch": 0, "wait": 2}
    assert state["callbacks"]["plateau"]["wait"] == 2 and state["callbacks"]["plateau"]["best"] == 1.0

    _script_the_monitor(monkeypatch, script)
    assert run(TrainConfig(**cfg)) == 0
    seed = results(tmp_path / "run")["per_seed"][0]
    assert seed["steps"] == 10, seed  # stopped after epoch 5
    assert seed["history"]["val_MAE"] == [2.0, 2.0]  # epochs 4 and 5, from the resume on
    assert seed["final_learning_rate"] == pytest.approx(2e-3)  # halved once, at epoch 4
    assert seed["best_epoch"] == 1 and seed["best_val_MAE"] == 1.0


@pytest.mark.slow
def test_rerun_with_another_model_dim_is_refused_through_the_cli(small_data, tmp_path, capsys,
                                                                _legacy_rng_after):
    args = TINY + [f"--data_dir={small_data}", f"--workdir={tmp_path / 'run'}", "--epochs=1",
                   "--seeds=1", "--jit_compile=false"]  # the identity check is under test
    code, _, err = main_in_process(args, capsys)
    assert code == 0, err
    code, out, err = main_in_process(args + ["--model_dim=32"], capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, (out, err)
    assert len(lines) == 1 and "model_dim: expected 32, found 16" in lines[0], err
    assert "Traceback" not in err
