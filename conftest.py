"""Shared by the tests and the docstring examples (`--doctest-modules` on msa_xla)."""
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _float32_policy_and_doctest_names(doctest_namespace):
    """Every test and example starts under the float32 policy (a test that sets a mixed policy
    must not decide the dtypes of whatever runs next in its worker), and the examples may use
    np, tf and keras without importing them."""
    import tensorflow as tf
    import tf_keras as keras

    keras.mixed_precision.set_global_policy("float32")
    doctest_namespace.update(np=np, tf=tf, keras=keras)
