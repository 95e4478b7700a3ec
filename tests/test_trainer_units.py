"""Units of msa_xla/trainer in this process, no training run: replica slicing and eval padding
(inputs.py), TrainConfig validation (config.py), the stateful callbacks' state round trip
(callbacks.py), the fused Adam update (optimizer.py), a NaN loss ending main() with exit
code 3, and the trainer's choice of CPU allocator (runtime/allocator.py)."""
import math
import os
import types

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from msa_xla import cli
from msa_xla.errors import UserError
from msa_xla.trainer.callbacks import EarlyStoppingBest, PlateauLR
from msa_xla.trainer.config import TrainConfig
from msa_xla.trainer.inputs import _slice_for_replicas, eval_data, train_data
from msa_xla.trainer.optimizer import FusedAdam
from tests.train_helpers import make_tiny_dataset

SIZES = (32, 13, 10)  # train / valid / test: 13 and 10 are not multiples of the batch
BATCH = 8


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("units") / "data", sizes=SIZES)


def _batches(dataset, count):
    return [tf.nest.map_structure(lambda t: t.numpy(), b) for b in dataset.take(count)]


def _replica_rows(strategy, distributed, count):
    """Each of `count` distributed steps as [per-replica numpy structures]."""
    steps = []
    for element in distributed:
        steps.append([tf.nest.map_structure(lambda t: t.numpy(), r)
                      for r in _local_results(strategy, element)])
        if len(steps) == count:
            break
    return steps


def _local_results(strategy, element):
    """A distributed element -> one structure of tensors per replica."""
    leaves = [strategy.experimental_local_results(leaf) for leaf in tf.nest.flatten(element)]
    return [tf.nest.pack_sequence_as(element, [parts[r] for parts in leaves])
            for r in range(strategy.num_replicas_in_sync)]


def _concat(structures):
    return tf.nest.map_structure(lambda *parts: np.concatenate(parts), *structures)


def _assert_equal_structures(got, want):
    for g, w in zip(tf.nest.flatten(got), tf.nest.flatten(want)):
        np.testing.assert_array_equal(g, w)


# ---------------------------------------------------------------------------- inputs.py
class _Context:  # what _slice_for_replicas reads from tf.distribute.InputContext
    def __init__(self, pipelines, pipeline):
        self.num_input_pipelines, self.input_pipeline_id = pipelines, pipeline


@pytest.mark.parametrize("replicas,pipelines", [(2, 1), (4, 1), (4, 2), (8, 4)])
def test_slices_of_a_global_batch_are_its_consecutive_rows_per_replica(data_dir, replicas,
                                                                       pipelines):
    (global_batch,) = _batches(train_data(data_dir, BATCH, tf.distribute.get_strategy(),
                                          seed=3), 1)
    per_replica, local = BATCH // replicas, replicas // pipelines
    seen = []
    for pipeline in range(pipelines):
        split = _slice_for_replicas(BATCH, replicas, _Context(pipelines, pipeline))
        element = tf.nest.map_structure(tf.constant, global_batch)
        parts = [tf.nest.map_structure(lambda t: t.numpy(), p) for p in split(*element)]
        assert len(parts) == local  # one element per local replica
        for r, part in enumerate(parts):
            start = ((pipeline * local) + r) * per_replica  # replica r of pipeline w
            want = tf.nest.map_structure(lambda t, s=start: t[s:s + per_replica], global_batch)
            _assert_equal_structures(part, want)
            seen.append(part)
    _assert_equal_structures(_concat(seen), global_batch)  # every row once, in order


@pytest.fixture(scope="module")
def two_replicas():
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def test_two_replicas_see_exactly_the_rows_of_the_one_replica_run(data_dir, two_replicas):
    one = _batches(train_data(data_dir, BATCH, tf.distribute.get_strategy(), seed=3,
                              start_step=2), 3)
    two = _replica_rows(two_replicas, train_data(data_dir, BATCH, two_replicas, seed=3,
                                                 start_step=2), 3)
    assert len(two) == 3
    for step, (single, replicas) in enumerate(zip(one, two)):
        assert [r[1].shape[0] for r in replicas] == [BATCH // 2] * 2, step
        _assert_equal_structures(_concat(replicas), single)


@pytest.mark.parametrize("split,count", [("valid", SIZES[1]), ("test", SIZES[2])])
def test_eval_batches_are_padded_with_weight_0_and_score_every_clip_once(data_dir, split, count):
    batches = _batches(eval_data(data_dir, split, BATCH, tf.distribute.get_strategy()), 100)
    assert len(batches) == math.ceil(count / BATCH)
    for inputs, label, weight in batches:
        assert label.shape == (BATCH, 1) and weight.shape == (BATCH,)
        assert all(t.shape[0] == BATCH for t in inputs)
        assert set(np.unique(weight)) <= {0.0, 1.0}
        padding = weight == 0
        assert np.all(label[padding] == 0)
        for t in inputs:  # padded clips: zero features and all-False masks
            assert not np.any(t[padding])
    weights = np.concatenate([w for _, _, w in batches])
    assert weights.sum() == count and np.all(weights[:count] == 1) and np.all(weights[count:] == 0)
    # The weight-1 clips, in order, are the split's clips (source order, each once).
    from msa_xla.data import make_dataset

    (_, all_labels), = _batches(make_dataset(data_dir, split, count, shuffle=False), 1)
    scored = np.concatenate([y[w == 1] for _, y, w in batches])
    np.testing.assert_array_equal(scored, all_labels)


def test_eval_under_two_replicas_pads_and_slices_the_same_rows(data_dir, two_replicas):
    one = _batches(eval_data(data_dir, "valid", BATCH, tf.distribute.get_strategy()), 100)
    two = _replica_rows(two_replicas, eval_data(data_dir, "valid", BATCH, two_replicas),
                        len(one))
    assert len(two) == len(one) == 2
    for single, replicas in zip(one, two):
        _assert_equal_structures(_concat(replicas), single)
    # The last global batch: 5 clips; replica 0 has 4 of them, replica 1 one and 3 padded.
    assert [r[2].tolist() for r in two[-1]] == [[1, 1, 1, 1], [1, 0, 0, 0]]


# ---------------------------------------------------------------------------- config.py
BAD_CONFIGS = [
    ("model", "transformer"), ("strategy", "gpu"), ("precision", "fp16"),
    ("jit_compile", "maybe"), ("pooling_method", "max"), ("attention_impl", "flash"),
    ("text_input", "words"), ("model_dim", 0), ("num_heads", 0), ("ff_dim", -1),
    ("n_layers_mod", 0), ("epochs", 0), ("batch_size", -8), ("learning_rate", 0.0),
    ("learning_rate", -0.001), ("learning_rate", float("nan")), ("learning_rate", float("inf")),
    ("clipnorm", -1.0), ("clipnorm", float("nan")), ("checkpoint_every", -5),
    ("steps_per_execution", -1), ("dropout_rate", 1.0), ("dropout_rate", -0.1),
    ("lr_plateau_factor", 1.5), ("lr_plateau_factor", 0.0), ("lr_plateau_factor", -0.5),
    ("profile_steps", (5, 2)), ("profile_steps", (1, 2, 3)), ("n_layers_fuse", -1),
    ("early_stopping_patience", -1), ("lr_plateau_patience", -2),
]


@pytest.mark.parametrize("name,value", BAD_CONFIGS, ids=[f"{n}={v}" for n, v in BAD_CONFIGS])
def test_each_bad_config_value_is_a_user_error_naming_flag_and_value(name, value):
    with pytest.raises(UserError) as caught:
        TrainConfig(**{name: value})
    message = str(caught.value)
    assert message.startswith(f"--{name}={value}"), message
    assert "\n" not in message


def test_empty_seeds_and_non_integer_flag_lists_are_user_errors():
    with pytest.raises(UserError, match="^--seeds needs at least one seed$"):
        TrainConfig(seeds=())
    flags = {"seeds": types.SimpleNamespace(value=["1", "two"])}
    with pytest.raises(UserError, match=r"^--seeds=\['1', 'two'\]: expected comma-separated"):
        TrainConfig.from_flags(flags)
    flags = {"seeds": types.SimpleNamespace(value="7, 8"),
             "profile_steps": types.SimpleNamespace(value=["2", "4"])}
    cfg = TrainConfig.from_flags(flags)
    assert cfg.seeds == (7, 8) and cfg.profile_steps == (2, 4)


def test_the_defaults_are_valid():
    assert TrainConfig().to_dict()["model"] == "seqlevel"


# ---------------------------------------------------------------------------- callbacks.py
def _tiny_model():
    model = keras.Sequential([keras.layers.Dense(1, input_shape=(2,))])
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss="mae")
    return model


def _epochs(callback, values, first_epoch=0):
    for epoch, value in enumerate(values, start=first_epoch):
        callback.on_epoch_end(epoch, {"val_MAE": value})


def test_early_stopping_state_round_trip_continues_patience(tmp_path):
    model = _tiny_model()
    first = EarlyStoppingBest(patience=3, best_dir=str(tmp_path / "best"))
    first.set_model(model)
    first.on_train_begin()
    _epochs(first, [1.0, 0.8, 0.9, 0.95])  # best 0.8 at epoch 1, then 2 epochs without
    state = first.get_state()
    assert state == {"best": pytest.approx(0.8), "best_epoch": 1, "wait": 2}
    assert not model.stop_training

    resumed = EarlyStoppingBest(patience=3, best_dir=str(tmp_path / "best"))
    resumed.set_model(model)
    resumed.set_state(state)
    resumed.on_train_begin()
    assert resumed.get_state() == state
    _epochs(resumed, [0.99], first_epoch=4)  # the third epoch without a better value: stop
    assert model.stop_training and resumed.stopped_epoch == 4
    assert resumed.best_epoch == 1

    # Without the state, the same epoch would be a new best and not stop.
    model.stop_training = False
    fresh = EarlyStoppingBest(patience=3, best_dir=str(tmp_path / "fresh"))
    fresh.set_model(model)
    fresh.on_train_begin()
    _epochs(fresh, [0.99], first_epoch=4)
    assert not model.stop_training and fresh.get_state()["wait"] == 0


def test_early_stopping_resumed_improvement_resets_the_wait(tmp_path):
    model = _tiny_model()
    resumed = EarlyStoppingBest(patience=3, best_dir=str(tmp_path / "best"))
    resumed.set_model(model)
    resumed.set_state({"best": 0.8, "best_epoch": 1, "wait": 2})
    resumed.on_train_begin()
    _epochs(resumed, [0.7, 0.75, 0.76], first_epoch=4)
    assert resumed.get_state() == {"best": pytest.approx(0.7), "best_epoch": 4, "wait": 2}
    assert not model.stop_training


def _plateau(model):
    callback = PlateauLR(monitor="val_MAE", mode="min", factor=0.5, patience=3, cooldown=1)
    callback.set_model(model)
    return callback


def _lr(model):
    return float(keras.backend.get_value(model.optimizer.learning_rate))


PLATEAU_VALUES = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 0.9, 1.0]


def test_plateau_resumed_every_epoch_follows_the_uninterrupted_run():
    # One callback over all epochs, and a chain of fresh callbacks each given the state the
    # previous one saved (a resume after every epoch): same counters, same LR, every epoch.
    whole_model, chain_model = _tiny_model(), _tiny_model()
    whole = _plateau(whole_model)
    whole.on_train_begin()
    state, seen = None, []
    for epoch, value in enumerate(PLATEAU_VALUES):
        whole.on_epoch_end(epoch, {"val_MAE": value})
        resumed = _plateau(chain_model)
        if state is not None:
            resumed.set_state(state)
        resumed.on_train_begin()  # keras resets the counters here; the state is put back after
        assert state is None or resumed.get_state() == state
        resumed.on_epoch_end(epoch, {"val_MAE": value})
        state = resumed.get_state()
        assert state == whole.get_state(), epoch
        assert _lr(chain_model) == _lr(whole_model), epoch
        seen.append((state["wait"], state["cooldown_counter"], round(_lr(whole_model), 6)))
    # What that run is: the LR halves after 3 epochs without a better value (epoch 3), the
    # cooldown epoch counts no wait, then it halves again at epoch 7; 0.9 is a new best.
    assert seen == [(0, 0, 0.1), (1, 0, 0.1), (2, 0, 0.1), (0, 1, 0.05), (1, 0, 0.05),
                    (2, 0, 0.05), (0, 1, 0.025), (1, 0, 0.025), (0, 0, 0.025), (1, 0, 0.025)]
    # Without the state a fresh callback restarts: at epoch 3 it keeps the LR.
    fresh_model = _tiny_model()
    fresh = _plateau(fresh_model)
    fresh.on_train_begin()
    fresh.on_epoch_end(3, {"val_MAE": 1.3})
    assert fresh.get_state()["wait"] == 0 and _lr(fresh_model) == pytest.approx(0.1)


# ---------------------------------------------------------------------------- main.py
def _main_in_process(argv, capsys):
    """`python -m msa_xla.train ARGV` in this process (tests/test_train.py's helper)."""
    from msa_xla.trainer.main import FLAGS, main

    try:
        code = main(cli.absl_flags_parser(FLAGS)(["msa_xla.train", *argv]))
    except SystemExit as stop:
        code = stop.code
    finally:
        FLAGS.unparse_flags()
        keras.backend.experimental.disable_tf_random_generator()  # run() enables it
    return code, capsys.readouterr().err


def test_nan_loss_exits_3_with_one_error_line(data_dir, tmp_path, capsys, monkeypatch):
    # NaN labels (the pipeline refuses non-finite data, so they are put in after it): the
    # first step's loss is NaN, NanGuard stops the fit, main reports it and exits 3.
    from msa_xla.trainer import loop

    def nan_labels(*args, **kwargs):
        return loop_train_data(*args, **kwargs).map(lambda x, y: (x, y * float("nan")))

    loop_train_data = loop.train_data
    monkeypatch.setattr(loop, "train_data", nan_labels)
    code, err = _main_in_process([
        f"--data_dir={data_dir}", f"--workdir={tmp_path / 'run'}", "--model=msa",
        "--model_dim=16", "--num_heads=2", "--ff_dim=32", "--n_layers_mod=1",
        "--n_layers_fuse=1", f"--batch_size={BATCH}", "--epochs=1", "--verbose=0",
        "--jit_compile=false", "--strategy=cpu"], capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == cli.EXIT_DIVERGED == 3, err
    assert lines == ["error: training loss is nan at step 1; stopped (try a lower "
                     "--learning_rate or --clipnorm=1.0)"], err
    assert "Traceback" not in err


# ---- optimizer.py: the fused Adam update ----------------------------------------------------------
def _fit_small_model(optimizer, jit_compile):
    keras.backend.clear_session()  # the same layer names, so the same slot names, each time
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer=optimizer, loss="mae", jit_compile=jit_compile)
    x = np.random.default_rng(0).normal(size=(48, 5)).astype("float32")
    model.fit(x, x.sum(axis=1, keepdims=True), batch_size=8, epochs=3, shuffle=False, verbose=0)
    return model


@pytest.mark.parametrize("jit_compile", [True, False])
def test_fused_adam_takes_keras_adams_steps_on_the_same_slots(jit_compile):
    reference = _fit_small_model(keras.optimizers.Adam(0.05), jit_compile)
    fused = _fit_small_model(FusedAdam(0.05), jit_compile)
    moved = 0.0
    for a, b, before in zip(reference.get_weights(), fused.get_weights(),
                            _fit_small_model(FusedAdam(0.0), jit_compile).get_weights()):
        np.testing.assert_allclose(b, a, atol=2e-5)  # 18 steps of 0.05: rounding apart only
        moved = max(moved, float(np.max(np.abs(a - before))))
    assert moved > 0.1  # the steps themselves are far larger than that tolerance
    # The same slot variables (names, shapes, values): checkpoints keep their layout.
    assert [v.name for v in fused.optimizer.variables] == \
        [v.name for v in reference.optimizer.variables]
    for a, b in zip(reference.optimizer.variables, fused.optimizer.variables):
        np.testing.assert_allclose(b.numpy(), a.numpy(), atol=2e-5)


def test_fused_adam_writes_one_update_op_per_variable():
    variables = [tf.Variable(tf.ones([3, 2])), tf.Variable(tf.zeros([2]))]

    def op_types(optimizer):
        optimizer.build(variables)
        step = tf.function(lambda: optimizer.apply_gradients(
            [(tf.ones_like(v), v) for v in variables]))
        return [op.type for op in step.get_concrete_function().graph.get_operations()]

    fused, reference = op_types(FusedAdam(0.1)), op_types(keras.optimizers.Adam(0.1))
    assert fused.count("ResourceApplyAdam") == 2 and "ResourceApplyAdam" not in reference
    assert len(fused) < len(reference) / 2, (len(fused), len(reference))


def test_the_pooled_cpu_allocator_is_asked_for_unless_the_environment_decides(monkeypatch):
    from msa_xla.runtime import allocator

    monkeypatch.delenv(allocator.VARIABLE, raising=False)
    allocator.prefer_pooled_cpu_allocator()
    assert os.environ[allocator.VARIABLE] == "true"
    monkeypatch.setenv(allocator.VARIABLE, "false")  # a user's malloc stays malloc
    allocator.prefer_pooled_cpu_allocator()
    assert os.environ[allocator.VARIABLE] == "false"
