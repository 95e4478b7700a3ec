"""Shared by the tests and the docstring examples (`--doctest-modules` on msa_xla)."""
import atexit
import os
import shutil
import tempfile

import numpy as np
import pytest


def _append_flag(variable, flag):
    """Adds `flag` to the flags already in the environment variable `variable`."""
    os.environ[variable] = " ".join(filter(None, [os.environ.get(variable), flag]))


# One XLA compilation cache for the whole test session: the pytest workers and every trainer
# process they start compile the same tiny models again and again (the SIGKILLed runs of one
# config and their resume, N-replica runs against 1-replica ones). TensorFlow keys an entry by
# the HLO module and checks the stored HLO equals the new one before it loads the executable,
# and writes each entry to a temporary file it then renames, so concurrent processes are safe.
# The folder is new for each session (a clean clone compiles everything once) and is removed
# at its end. Set before TensorFlow is imported: its flags are read once.
_CACHE_VARIABLE = "MSA_XLA_TEST_XLA_CACHE"
if _CACHE_VARIABLE not in os.environ:  # the session's first process (the xdist controller)
    os.environ[_CACHE_VARIABLE] = tempfile.mkdtemp(prefix="msa_xla-test-xla-cache-")
    atexit.register(shutil.rmtree, os.environ[_CACHE_VARIABLE], ignore_errors=True)
    _append_flag("TF_XLA_FLAGS",
                 f"--tf_xla_persistent_cache_directory={os.environ[_CACHE_VARIABLE]}")
    # LLVM's optimisation of the generated CPU code is a large part of each compilation and buys
    # nothing for the tests' tiny models, which run a few dozen steps (a tiny model's first
    # trainer run: ~25-30 s -> ~20 s). It moves results in the last bits only (at higher levels
    # LLVM may fuse a multiply and an add: max |difference| 7e-7 in a small model's gradients),
    # and every process of the session, trainer subprocesses included, compiles at this level.
    _append_flag("XLA_FLAGS", "--xla_backend_optimization_level=0")

# The workers allocate as the trainer does: their in-process trainer runs are then the ones
# `python -m msa_xla.train` makes. Read when TF creates devices. This is
# msa_xla.runtime.allocator.prefer_pooled_cpu_allocator written out: importing it would import
# msa_xla, and with it TensorFlow, into the xdist controller, which never runs TF.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")


@pytest.fixture(autouse=True)
def _float32_policy_and_doctest_names(doctest_namespace):
    """Every test and example starts under the float32 policy (a test that sets a mixed policy
    must not decide the dtypes of whatever runs next in its worker), and the examples may use
    np, tf and keras without importing them."""
    import tensorflow as tf
    import tf_keras as keras

    keras.mixed_precision.set_global_policy("float32")
    doctest_namespace.update(np=np, tf=tf, keras=keras)


def pytest_collection_modifyitems(config, items):
    """Slow tests first, each tier in collection order. The two workers then start on the long
    end-to-end runs and finish on the short tests, instead of one worker still running a
    two-minute test after the other has run out of work."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # a stable sort
