"""Names every docstring example may use without importing them (`--doctest-modules` on msa_xla)."""
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    import tensorflow as tf
    import tf_keras as keras

    doctest_namespace.update(np=np, tf=tf, keras=keras)
