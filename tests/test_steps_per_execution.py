"""Several train steps per host call (what TPU and GPU runs use by default): same weights as one
step per call, one host synchronisation per execution, mid-epoch checkpoints still written."""
import numpy as np
import pytest
import tf_keras as keras
from tensorflow.python.framework import ops as tf_ops

from msa_xla.trainer import loop
from msa_xla.trainer.config import TrainConfig
from msa_xla.trainer.step import AUTO_STEPS_PER_EXECUTION, steps_per_execution_for
from tests.train_helpers import make_tiny_dataset, model_weights


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    # 96 training clips at batch 8: 12 steps an epoch, 3 executions of 4.
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny", sizes=(96, 16, 24))


@pytest.fixture(autouse=True)
def _legacy_rng_after():
    yield
    keras.backend.experimental.disable_tf_random_generator()  # run() enables it process-wide


def tiny_config(data_dir, workdir, **overrides):
    values = dict(data_dir=data_dir, workdir=str(workdir), model_dim=16, num_heads=2, ff_dim=32,
                  n_layers_mod=1, n_layers_fuse=1, batch_size=8, learning_rate=3e-3, epochs=2,
                  verbose=0, checkpoint_every=0, seeds=(5,))
    values.update(overrides)
    return TrainConfig(**values)


def _train(cfg):
    from msa_xla.trainer.main import run

    assert run(cfg) == 0
    return model_weights(f"{cfg.workdir}/seed_5/model.keras")


@pytest.mark.slow
# The balanced model: its own train_step (OGM-GE) under steps_per_execution; the default step's
# batch hooks per execution are checked below (one host read, mid-epoch checkpoints).
@pytest.mark.parametrize("model", ["balanced"])
def test_four_steps_per_execution_give_the_same_weights_as_one(data_dir, tmp_path, model):
    one = _train(tiny_config(data_dir, tmp_path / "one", model=model, steps_per_execution=1))
    four = _train(tiny_config(data_dir, tmp_path / "four", model=model, steps_per_execution=4))
    assert len(one) == len(four)
    for a, b in zip(one, four):
        np.testing.assert_array_equal(a, b)


class _SyncCounter:
    """Counts reads of device values into Python (`EagerTensor._numpy`, which `.numpy()`,
    `float()` and variable reads go through) in each execution's batch hooks."""

    def __init__(self, monkeypatch):
        self.reads = 0
        real = tf_ops._EagerTensorBase._numpy

        def counting(tensor):
            self.reads += 1
            return real(tensor)

        monkeypatch.setattr(tf_ops._EagerTensorBase, "_numpy", counting)
        self.per_execution = []
        counter = self

        class First(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self._supports_tf_logs = True

            def on_train_batch_begin(self, batch, logs=None):
                counter._start = counter.reads

        class Last(First):
            def on_train_batch_begin(self, batch, logs=None):
                pass

            def on_train_batch_end(self, batch, logs=None):
                counter.per_execution.append(counter.reads - counter._start)

        self.first, self.last = First(), Last()


@pytest.mark.slow
def test_four_steps_per_execution_read_the_host_once_each_and_checkpoint_mid_epoch(
        data_dir, tmp_path):
    # One run at 4 steps per execution with checkpoints every 5 steps and a profile window,
    # probed: device reads in each execution's batch hooks, and the steps checkpoints were
    # saved at (one run for both checks: each is a trainer run with XLA).
    saved = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        counter = _SyncCounter(monkeypatch)
        real_build = loop.build_callbacks

        def build_with_probes(*args, **kwargs):
            callbacks, handles = real_build(*args, **kwargs)
            saved["checkpoint"] = handles["checkpoint"]
            return [counter.first] + callbacks + [counter.last], handles

        monkeypatch.setattr(loop, "build_callbacks", build_with_probes)
        _train(tiny_config(data_dir, tmp_path / "run", steps_per_execution=4,
                           checkpoint_every=5, profile_steps=(20, 22),
                           profile_dir=str(tmp_path / "profile")))
    executions = counter.per_execution

    # 2 epochs x 3 executions, ending at steps 4, 8, 12 | 16, 20, 24. The NaN check's read of
    # the loss is the only read of each, except: the run's first execution, after which
    # TensorBoard writes the train graph once (it checks whether summaries are recorded); the
    # executions after which a mid-epoch checkpoint is written (steps 8 and 20: a save reads
    # the step and writes every variable); and the profile window's two ends (steps 20, 24:
    # it waits for the device at both ends).
    assert len(executions) == 6
    assert executions[0] == 2, executions
    assert [executions[i] for i in (2, 3)] == [1, 1], executions
    assert min(executions[i] for i in (1, 4, 5)) >= 1, executions

    # 4 does not divide checkpoint_every=5: mid-epoch saves at the first execution end once 5
    # steps have passed since the last save (8; 20, as 16 is 4 after the epoch end's 12), and
    # every epoch end (12, 24).
    assert saved["checkpoint"].saved_steps == [8, 12, 20, 24]


def test_auto_steps_per_execution_by_platform():
    import tensorflow as tf

    cpu = tf.distribute.OneDeviceStrategy("/cpu:0")
    assert steps_per_execution_for(0, cpu, 40) == 1
    assert steps_per_execution_for(3, cpu, 40) == 3

    class FakeGpuStrategy:  # device_platform reads the strategy's worker devices
        class extended:
            worker_devices = ("/job:localhost/replica:0/task:0/device:GPU:0",)

    assert steps_per_execution_for(0, FakeGpuStrategy(), 40) == 40  # at most one epoch
    assert steps_per_execution_for(0, FakeGpuStrategy(), 10 ** 4) == AUTO_STEPS_PER_EXECUTION
    assert steps_per_execution_for(7, FakeGpuStrategy(), 10 ** 4) == 7
