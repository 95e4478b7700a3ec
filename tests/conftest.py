"""Shared test set-up: quiet TF logs, two logical CPUs, fixed seeds, float32 policy restored.

The CPU is split into two logical devices before TensorFlow initialises, so tests can build a
MirroredStrategy over two replicas in this process (what a multi-GPU or TPU run executes,
emulated on CPU: tests/test_accelerator.py). Ops without a device scope still run on CPU:0.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

TEST_CPU_DEVICES = 2
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration() for _ in range(TEST_CPU_DEVICES)])


@pytest.fixture(autouse=True)
def _isolate_keras_state():
    """Each test starts from float32 and a fixed seed, and leaves no global policy behind."""
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(0)
    np.random.seed(0)
    yield
    keras.mixed_precision.set_global_policy("float32")
    keras.backend.clear_session()
