"""Shared test set-up: quiet TF logs, fixed seeds, float32 policy restored after each test."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tf_keras as keras


@pytest.fixture(autouse=True)
def _isolate_keras_state():
    """Each test starts from float32 and a fixed seed, and leaves no global policy behind."""
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(0)
    np.random.seed(0)
    yield
    keras.mixed_precision.set_global_policy("float32")
    keras.backend.clear_session()
