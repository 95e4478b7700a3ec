"""Checkpoints, resume, the workdir lock and graceful preemption.

Layout of one seed's run folder:

    <workdir>/.lock                      held (fcntl) while a run uses the workdir
    <workdir>/seed_<s>/checkpoints/      ckpt-<step>.* (model, optimizer incl. learning rate and
                                         step counter, dropout RNG states), trainer-<step>.json
                                         (epoch, callback states), identity.json
    <workdir>/seed_<s>/best/epoch-<e>.*  weights of the best validation epoch so far (and the one before)
    <workdir>/.worker-<i>/seed_<s>/      the same, written by non-chief worker i (multi-worker)

Resume = rerun the same command: the latest checkpoint is restored, the input stream skips the
batches already consumed (inputs.py), Keras resumes mid-epoch at the right step, and the
callbacks get their patience counters back, so the run finishes the same total number of steps.
With --deterministic the final weights equal an uninterrupted run's (tests/test_train.py).

Multi-worker: the workdir must be a folder every worker sees. Each non-chief worker keeps its
own copy of the run state (TF saves on every worker in lockstep), but when a seed starts it
replaces that copy with the chief's (`sync_from_chief`): after a crash every worker resumes from
the one shared checkpoint, whichever worker died, and a copy the dead worker left half-written
is never read.

SIGTERM (preemption): the checkpoint callback saves at the end of the current step and stops;
the trainer then exits with cli.EXIT_PREEMPTED (143 = 128 + SIGTERM, what schedulers expect).
"""

from __future__ import annotations

import errno
import fcntl
import os

import tensorflow as tf

from msa_xla.errors import UserError
from msa_xla.runtime import compat, storage


class CheckpointError(UserError):
    """A workdir or checkpoint that this run must not use (one line)."""


# ----------------------------------------------------------------------------------------------
# workdir lock
# ----------------------------------------------------------------------------------------------


class WorkdirLock:
    """An exclusive lock on a workdir for the life of the process (released even on SIGKILL).

    Local workdirs only: `fcntl` locks need a POSIX filesystem, and object stores (gs://) have
    no locks. A remote workdir is not locked; two runs must not share one.
    """

    def __init__(self, workdir: str):
        self.path = storage.join(workdir, ".lock")
        self.remote = storage.is_remote(workdir)
        self._fd = None

    def acquire(self) -> WorkdirLock:
        if self.remote:
            storage.makedirs(storage.dirname(self.path))
            return self
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise CheckpointError(
                f"workdir {os.path.dirname(self.path)} is in use by another run (pid {holder}); "
                "wait for it to finish or pass another --workdir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self):
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def sync_from_chief(chief_seed_dir: str, own_seed_dir: str) -> None:
    """Makes a non-chief worker's run state a copy of the chief's (see the module docstring).

    Called before the seed's model is built. Race-free: the chief writes checkpoints, best
    weights and result.json only after training steps or an evaluation, and those need this
    worker's collectives first.
    """
    for name in ("checkpoints", "best", "result.json"):
        own = storage.join(own_seed_dir, name)
        if storage.isdir(own):
            storage.rmtree(own)
        elif storage.exists(own):
            storage.remove(own)
        shared = storage.join(chief_seed_dir, name)
        if storage.isdir(shared):
            storage.copytree(shared, own)
        elif storage.isfile(shared):
            storage.makedirs(own_seed_dir)
            storage.copy(shared, own, overwrite=True)


# ----------------------------------------------------------------------------------------------
# what a checkpoint holds
# ----------------------------------------------------------------------------------------------


def rng_state_variables(model) -> list:
    """The state variables of the layers' tf.random.Generator (dropout noise).

    tf_keras leaves a layer's `_random_generator` out of checkpoints, so without these a resumed
    run would draw other dropout masks than an uninterrupted one. They exist when
    `keras.backend.experimental.enable_tf_random_generator()` ran before the model was built.
    """
    states = []
    for layer in compat.all_layers(model):
        generator = compat.dropout_generator(layer)
        if generator is not None:
            states.append(generator.state)
    return states


class RunCheckpoint:
    """tf.train.CheckpointManager for one seed, plus trainer state and an identity check."""

    def __init__(self, directory: str, model, identity: dict, max_to_keep: int = 3):
        self.directory = directory
        self.model, self.identity = model, identity
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer,
                                              rng=rng_state_variables(model))
        self.manager = tf.train.CheckpointManager(self.checkpoint, directory,
                                                  max_to_keep=max_to_keep)

    @property
    def step(self) -> int:
        return int(self.model.optimizer.iterations.numpy())

    def check_identity(self):
        """Refuses a checkpoint folder written by another model/config: expected vs found."""
        check_identity(self.directory, self.identity)

    def restore_latest(self) -> dict | None:
        """Restores the newest checkpoint; returns its trainer state, or None for a fresh run."""
        self.check_identity()
        latest = self.manager.latest_checkpoint
        if latest is None:
            return None
        self.checkpoint.restore(latest).assert_existing_objects_matched()
        return storage.read_json(storage.join(self.directory, f"trainer-{self.step}.json"))

    def save(self, trainer_state: dict) -> str:
        """Writes trainer state, then the checkpoint (whose index file commits both)."""
        storage.makedirs(self.directory)
        identity_path = storage.join(self.directory, "identity.json")
        if not storage.isfile(identity_path):
            write_json(identity_path, self.identity)
        step = self.step
        write_json(storage.join(self.directory, f"trainer-{step}.json"),
                   {**trainer_state, "step": step})
        path = self.manager.save(checkpoint_number=step)
        kept = {int(p.rsplit("-", 1)[1]) for p in self.manager.checkpoints}
        for stale in storage.glob(storage.join(self.directory, "trainer-*.json")):
            if int(stale.rsplit("-", 1)[1].split(".")[0]) not in kept:
                storage.remove(stale)
        return path


def check_identity(directory: str, identity: dict) -> None:
    """Raises CheckpointError (one line, expected vs found) if the checkpoint folder `directory`
    was written under another identity; a folder without identity.json passes."""
    path = storage.join(directory, "identity.json")
    if not storage.isfile(path):
        return
    found = storage.read_json(path)
    diffs = [f"{key}: expected {identity.get(key)!r}, found {found.get(key)!r}"
             for key in sorted(set(found) | set(identity))
             if found.get(key) != identity.get(key)]
    if diffs:
        raise CheckpointError(
            f"checkpoint in {directory} is from a different model/config ("
            + "; ".join(diffs) + "); pass another --workdir or the same flags")


def write_json(path, value):
    """The trainer's JSON files: atomic (a crash leaves the old file or the new one), local or
    remote."""
    storage.write_json_atomic(path, value, indent=1, sort_keys=True)
