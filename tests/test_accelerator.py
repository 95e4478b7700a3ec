"""What a TPU or multi-GPU run executes, emulated on CPU (the accelerator-semantics tier).

- MirroredStrategy over the two logical CPUs of the test process (tests/conftest.py) with each
  mixed policy: the trainer's own split-step path, end to end.
- MirroredStrategy's GPU path: on GPUs under XLA, MirroredStrategy skips `merge_call`
  (`MirroredExtended._use_merge_call` is False inside an XLA context on all-GPU devices), so
  metrics, loss scaling and the gradient all-reduce run inside the replica function. Forcing
  `_use_merge_call` to False here runs that same Python path on two logical CPUs (without XLA:
  XLA:CPU has no collectives).
"""
import math

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from msa_xla.config import TrainConfig
from msa_xla.data import load_metadata
from tests.train_helpers import make_tiny_dataset, results

pytestmark = pytest.mark.accelerator

MODELS = ("seqlevel", "msa", "improved", "balanced")
MIXED = ("mixed_bfloat16", "mixed_float16")


@pytest.fixture(scope="module")
def token_data(tmp_path_factory):
    """A tiny dataset with both float text features and token ids."""
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny", tokenize=True)


@pytest.fixture(autouse=True)
def _legacy_rng_after():
    yield
    keras.backend.experimental.disable_tf_random_generator()  # run() enables it process-wide


def tiny_config(data_dir, workdir, **overrides):
    values = dict(data_dir=data_dir, workdir=str(workdir), model_dim=16, num_heads=2, ff_dim=32,
                  n_layers_mod=1, n_layers_fuse=1, batch_size=8, learning_rate=3e-3, epochs=1,
                  verbose=0, checkpoint_every=0)
    values.update(overrides)
    return TrainConfig(**values)


def gpu_like_mirrored_strategy():
    """MirroredStrategy over the two logical CPUs with merge_call disabled, as on GPUs + XLA."""
    # A new key range per strategy, as TF's own strategy_combinations do: strategies built in one
    # process otherwise reuse collective instance keys and their all-reduces mix.
    tf.distribute.MirroredStrategy._collective_key_base += 100000
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    strategy.extended._use_merge_call = lambda: False
    return strategy


# ---- 1: mixed precision under MirroredStrategy, through the trainer -------------------------------
@pytest.mark.parametrize("model, policy", [("seqlevel", "mixed_bfloat16"),
                                           ("seqlevel", "mixed_float16"),
                                           ("balanced", "mixed_bfloat16")])
def test_mirrored_two_cpus_with_mixed_precision_trains_and_writes_results(token_data, tmp_path,
                                                                          model, policy):
    # The reproduction: epoch-end metrics of a mixed policy used to raise
    # NotImplementedError (AutoCastVariable metric state read in a sync-on-read context).
    from msa_xla.train import run

    cfg = tiny_config(token_data, tmp_path / "run", model=model, strategy="mirrored",
                      precision=policy)
    assert run(cfg, cpu_replicas=2) == 0
    res = results(tmp_path / "run")
    assert res["replicas"] == 2 and res["precision"] == policy
    assert all(math.isfinite(v) for v in res["per_seed"][0]["test"].values())


# ---- 1, 2, 6: the GPU path (no merge_call) for every model, policy and text input ---------------
def _build(cfg, strategy):
    from msa_xla.seed_run import _build_model

    meta = load_metadata(cfg.data_dir)
    return _build_model(cfg, meta, strategy, seed=3)[0], meta


def _op_types(concrete_function):
    """Every op type of a traced function, nested functions (step, while bodies) included."""
    graph_def = concrete_function.graph.as_graph_def()
    types = {node.op for node in graph_def.node}
    for function in graph_def.library.function:
        types.update(node.op for node in function.node_def)
    return types


@pytest.mark.parametrize("text_input", ["features", "tokens"])
@pytest.mark.parametrize("policy", MIXED)
@pytest.mark.parametrize("model", MODELS)
def test_gpu_path_fit_and_evaluate(token_data, tmp_path, model, policy, text_input):
    from msa_xla import precision
    from msa_xla.train_input import eval_data, train_data

    precision.apply_precision(policy)
    strategy = gpu_like_mirrored_strategy()
    cfg = tiny_config(token_data, tmp_path / "run", model=model, precision=policy,
                      text_input=text_input, jit_compile="false")
    built, meta = _build(cfg, strategy)
    train = train_data(cfg.data_dir, 8, strategy, seed=1, text_input=text_input)
    valid = eval_data(cfg.data_dir, "valid", 8, strategy, text_input=text_input)
    history = built.fit(train, epochs=1, steps_per_epoch=2, verbose=0)
    assert all(math.isfinite(v[0]) for v in history.history.values()), history.history
    logs = built.evaluate(valid, steps=2, return_dict=True, verbose=0)
    assert all(math.isfinite(v) for v in logs.values()), logs
    # All-reduce of a sparse (IndexedSlices) gradient is a CollectiveGatherV2, which XLA on GPU
    # cannot compile: the token embedding's gradient must be dense.
    (step,) = built.train_function._list_all_concrete_functions()
    op_types = _op_types(step)
    assert "CollectiveReduceV2" in op_types  # the gradient all-reduce is in the traced step
    assert "CollectiveGatherV2" not in op_types


def test_gpu_path_progress_logs_are_not_multiplied_by_the_replica_count(token_data, tmp_path):
    # Without merge_call every replica returns the all-reduced metric values; tf_keras' default
    # "sum" reduction of per-replica logs would add them up (x2 here).
    strategy = gpu_like_mirrored_strategy()
    cfg = tiny_config(token_data, tmp_path / "run", jit_compile="false", learning_rate=1e-9)
    built, _ = _build(cfg, strategy)
    from msa_xla.train_input import eval_data

    valid = eval_data(cfg.data_dir, "valid", 8, strategy)
    seen = []
    batch_logs = keras.callbacks.LambdaCallback(
        on_test_batch_end=lambda batch, logs: seen.append(float(logs["MAE"])))
    logs = built.evaluate(valid, steps=2, return_dict=True, verbose=0, callbacks=[batch_logs])
    predictions = []
    labels = []
    for inputs, label, weight in eval_data(cfg.data_dir, "valid", 8,
                                           tf.distribute.get_strategy()).take(2):
        predictions.append(built(inputs, training=False).numpy()[:, 0])
        labels.append(label.numpy().ravel())
    expected = float(np.mean(np.abs(np.concatenate(predictions) - np.concatenate(labels))))
    assert seen[-1] == pytest.approx(expected, rel=1e-4)
    assert logs["MAE"] == pytest.approx(expected, rel=1e-4)
