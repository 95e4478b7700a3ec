"""Tests for msa_xla.metrics: hand-computed cases, bad inputs, streaming == numpy reference."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from msa_xla.metrics import METRIC_KEYS, MSAMetrics, msa_metrics

# Rounding ties and out-of-range predictions; one label exactly 0.
HAND_TRUE = [2.5, 0.5, -2.5, 2.4, -3.0, 0.0]
HAND_PRED = [2.0, -0.1, -2.0, 4.2, -3.7, -0.4]
HAND_EXPECTED = {
    # Has0: y>=0 = [T,T,F,T,F,T], p>=0 = [T,F,F,T,F,F] -> equal at 0,2,3,4: 4/6.
    "Has0_acc_2": 4 / 6,
    # class T: support 4, predicted {0,3}, P=1, R=1/2, F1=2/3; class F: support 2,
    # predicted {1,2,4,5}, P=1/2, R=1, F1=2/3 -> weighted (4*2/3 + 2*2/3)/6 = 2/3.
    "Has0_F1_score": 2 / 3,
    # Non0 drops clip 5: y>0 = [T,T,F,T,F], p>0 = [T,F,F,T,F] -> 4/5.
    "Non0_acc_2": 0.8,
    # class T: support 3, predicted {0,3}, P=1, R=2/3, F1=0.8; class F: support 2,
    # predicted {1,2,4}, P=2/3, R=1, F1=0.8 -> 0.8.
    "Non0_F1_score": 0.8,
    # clip [-2,2] then round half-even: y -> [2,0,-2,2,-2,0], p -> [2,-0,-2,2,-2,-0]: 6/6.
    "Mult_acc_5": 1.0,
    # clip [-3,3]: y -> [2,0,-2,2,-3,0] (2.5->2, 0.5->0, -2.5->-2), p -> [2,-0,-2,3,-3,-0]
    # (4.2 -> 3, -3.7 -> -3): only clip 3 differs: 5/6.
    "Mult_acc_7": 5 / 6,
    # |p-y| = 0.5, 0.6, 0.5, 1.8, 0.7, 0.4 -> 4.5 / 6.
    "MAE": 0.75,
    "Corr": float(np.corrcoef(HAND_TRUE, HAND_PRED)[0, 1]),
}

# All labels 0: the Non0 subset is empty and labels are constant.
ZERO_TRUE = [0.0, 0.0, 0.0]
ZERO_PRED = [0.5, -1.0, 0.0]
ZERO_EXPECTED = {
    "Has0_acc_2": 2 / 3,  # y>=0 all T, p>=0 = [T,F,T]
    "Has0_F1_score": 0.8,  # class T: P=1, R=2/3 -> 0.8; class F has support 0 -> weight 0
    "Non0_acc_2": 0.0,  # empty subset -> 0.0 by definition
    "Non0_F1_score": 0.0,
    "Mult_acc_5": 2 / 3,  # p rounds to [0 (0.5 half-even), -1, 0]
    "Mult_acc_7": 2 / 3,
    "MAE": 0.5,  # (0.5 + 1 + 0) / 3
    "Corr": 0.0,  # constant labels -> 0.0 by definition
}

# Constant predictions; class F never predicted.
CONST_TRUE = [1.0, -1.0, 2.0]
CONST_PRED = [0.3, 0.3, 0.3]
CONST_EXPECTED = {
    "Has0_acc_2": 2 / 3,
    # class T: support 2, predicted 3, P=2/3, R=1, F1=0.8; class F: never predicted, F1=0
    # -> (2*0.8 + 1*0)/3 = 0.5333 (sklearn zero_division=0 gives the same).
    "Has0_F1_score": 1.6 / 3,
    "Non0_acc_2": 2 / 3,
    "Non0_F1_score": 1.6 / 3,
    "Mult_acc_5": 0.0,  # y -> [1,-1,2], p -> [0,0,0]
    "Mult_acc_7": 0.0,
    "MAE": (0.7 + 1.3 + 1.7) / 3,
    "Corr": 0.0,  # constant predictions -> 0.0 by definition
}

CASES = [
    ("hand", HAND_TRUE, HAND_PRED, HAND_EXPECTED),
    ("all_zero_labels", ZERO_TRUE, ZERO_PRED, ZERO_EXPECTED),
    ("constant_predictions", CONST_TRUE, CONST_PRED, CONST_EXPECTED),
]


def _mosi_like_split(num_clips=997, seed=1):
    """Labels on MOSI's 1/3 grid (many exact 0 and .5-free), predictions spread past [-3, 3]."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(-9, 10, size=num_clips) / 3.0
    labels[:20] = [0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 0.0, 0.0, 3.0, -3.0] * 2  # ties, zeros
    preds = 0.6 * labels + rng.normal(scale=1.2, size=num_clips)
    preds[:6] = [0.5, -0.5, 2.5, -2.5, 4.2, -3.7]
    return labels.astype(np.float32), preds.astype(np.float32)


def _assert_close(actual, expected, abs_tol=1e-6):
    assert set(actual) == set(METRIC_KEYS)
    for key in METRIC_KEYS:
        assert float(actual[key]) == pytest.approx(expected[key], abs=abs_tol), key


# ---------------------------------------------------------------------------- numpy reference


@pytest.mark.parametrize("name,y_true,y_pred,expected", CASES, ids=[c[0] for c in CASES])
def test_reference_hand_cases(name, y_true, y_pred, expected):
    result = msa_metrics(y_true, y_pred)
    assert list(result) == list(METRIC_KEYS)
    assert all(type(value) is float for value in result.values())
    _assert_close(result, expected)


def test_reference_one_class_perfect_and_column_shapes():
    # Only positives, all predicted positive: both F1 are 1.0. (N, 1) and (N, 1, 1) accepted.
    result = msa_metrics(np.array([[1.0], [2.0]]), np.array([[[0.5]], [[3.0]]]))
    assert result["Has0_F1_score"] == result["Non0_F1_score"] == 1.0
    assert result["Has0_acc_2"] == result["Non0_acc_2"] == 1.0


def test_reference_corr_matches_numpy_on_a_split():
    labels, preds = _mosi_like_split()
    result = msa_metrics(labels, preds)
    assert result["Corr"] == pytest.approx(np.corrcoef(preds, labels)[0, 1], abs=1e-12)
    assert result["MAE"] == pytest.approx(np.mean(np.abs(preds - labels)), abs=1e-6)


@pytest.mark.parametrize(
    "y_true,y_pred,message",
    [
        ([1.0, 2.0, 3.0], [1.0, 2.0], "y_true has 3 clips but y_pred has 2"),
        ([], [], "at least one clip"),
        ([1.0, 2.0], [0.1, float("nan")], "y_pred has 1 non-finite value"),
        ([float("inf"), 2.0], [0.1, 0.2], "y_true has 1 non-finite value"),
        ([[1.0, 2.0], [3.0, 4.0]], [1.0, 2.0], r"y_true must have shape \(N,\) or \(N, 1\)"),
        (1.0, [1.0], "got a scalar"),
        (["a", "b"], [1.0, 2.0], "y_true must be numeric"),
    ],
)
def test_reference_rejects_bad_inputs(y_true, y_pred, message):
    with pytest.raises(ValueError, match=message):
        msa_metrics(y_true, y_pred)


# ---------------------------------------------------------------------------- streaming metric


@pytest.mark.parametrize("name,y_true,y_pred,expected", CASES, ids=[c[0] for c in CASES])
def test_streaming_hand_cases(name, y_true, y_pred, expected):
    metric = MSAMetrics()
    metric.update_state(tf.constant(y_true)[:, None], tf.constant(y_pred)[:, None])
    _assert_close(metric.result(), expected, abs_tol=1e-5)


def _feed_uneven(metric, labels, preds, update):
    start = 0
    for size in (1, 7, 300, 2, 64, 623):  # uneven batches; sums to 997
        update(labels[start : start + size, None], preds[start : start + size, None])
        start += size
    assert start == labels.size


def test_streaming_equals_reference_over_uneven_batches_eager_and_jit():
    labels, preds = _mosi_like_split()
    expected = msa_metrics(labels, preds)

    eager = MSAMetrics()
    _feed_uneven(eager, labels, preds, eager.update_state)
    _assert_close(eager.result(), expected, abs_tol=1e-5)

    compiled = MSAMetrics()

    @tf.function(jit_compile=True)
    def jit_update(y_true, y_pred):
        compiled.update_state(y_true, y_pred)  # Keras' wrapper returns an Op: do not return it

    _feed_uneven(compiled, labels, preds, jit_update)
    _assert_close(compiled.result(), expected, abs_tol=1e-5)
    jit_result = tf.function(compiled.result, jit_compile=True)()
    _assert_close(jit_result, expected, abs_tol=1e-5)


def test_streaming_accepts_other_float_dtypes_and_flat_shapes():
    labels, preds = _mosi_like_split(num_clips=64)
    metric = MSAMetrics()
    metric.update_state(tf.constant(labels, tf.float64), tf.constant(preds, tf.float16))
    expected = msa_metrics(labels, preds.astype(np.float16))
    _assert_close(metric.result(), expected, abs_tol=1e-5)


def test_streaming_sample_weight_zero_drops_padding_and_reset_clears():
    labels, preds = _mosi_like_split(num_clips=50)
    padded_labels = np.concatenate([labels, np.zeros(14, np.float32)])  # fixed batch of 64
    padded_preds = np.concatenate([preds, np.full(14, 9.0, np.float32)])
    weight = np.concatenate([np.ones(50), np.zeros(14)]).astype(np.float32)
    metric = MSAMetrics()
    metric.update_state(padded_labels, padded_preds, sample_weight=weight[:, None])
    _assert_close(metric.result(), msa_metrics(labels, preds), abs_tol=1e-5)

    metric.reset_state()
    assert all(float(tf.reduce_sum(tf.abs(v))) == 0.0 for v in metric.variables)
    assert all(float(value) == 0.0 for value in metric.result().values())  # empty -> 0.0


def test_fit_and_evaluate_logs_flatten_the_dict():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(96, 4)).astype(np.float32)
    labels = (rng.integers(-9, 10, size=(96, 1)) / 3).astype(np.float32)
    model = keras.Sequential([keras.layers.Dense(1, input_shape=(4,))])
    model.compile("sgd", "mae", metrics=[MSAMetrics()], jit_compile=True)
    history = model.fit(
        features, labels, batch_size=32, epochs=1, validation_data=(features, labels), verbose=0
    )
    for key in METRIC_KEYS:
        assert key in history.history and f"val_{key}" in history.history
    logs = model.evaluate(features, labels, batch_size=32, return_dict=True, verbose=0)
    assert set(logs) == {"loss", *METRIC_KEYS}
    _assert_close(
        {k: logs[k] for k in METRIC_KEYS},
        msa_metrics(labels, model.predict(features, verbose=0)),
        abs_tol=1e-5,
    )


_MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json, os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from msa_xla.metrics import MSAMetrics
    rng = np.random.default_rng(3)
    labels = (rng.integers(-9, 10, size=(1000, 1)) / 3).astype("float32")
    preds = (rng.normal(size=(1000, 1)) * 1.5).astype("float32")
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        metric = MSAMetrics()
    # 1000 = 15 * 64 + 40: the last global batch is uneven across the replicas.
    dataset = tf.data.Dataset.from_tensor_slices((labels, preds)).batch(64)

    @tf.function
    def step(batch):
        # Not jit-compiled: XLA on CPU cannot touch variables on logical device CPU:1.
        strategy.run(metric.update_state, args=batch)

    for batch in strategy.experimental_distribute_dataset(dataset):
        step(batch)
    result = {k: float(v) for k, v in metric.result().items()}
    print(json.dumps({"replicas": strategy.num_replicas_in_sync, "result": result,
                      "labels": labels.ravel().tolist(), "preds": preds.ravel().tolist()}))
    """
)


@pytest.mark.slow
def test_streaming_under_mirrored_strategy_two_logical_cpus():
    completed = subprocess.run(
        [sys.executable, "-c", _MIRRORED_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    output = json.loads(completed.stdout.strip().splitlines()[-1])
    assert output["replicas"] == 2
    expected = msa_metrics(output["labels"], output["preds"])
    _assert_close(output["result"], expected, abs_tol=1e-5)
