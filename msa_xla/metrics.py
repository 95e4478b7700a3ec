"""MSA regression metrics: a numpy reference and a streaming in-graph Keras metric.

The definitions are MMSA's for MOSI/MOSEI regression (docs/ARCHITECTURE.md §5), over predictions
`p` and labels `y`:

- `MAE`: mean |p - y|; `Corr`: Pearson r. Both on unclipped values.
- `Mult_acc_7`: clip both to [-3, 3], round half to even (`np.round`), share of equal classes.
  `Mult_acc_5`: the same with [-2, 2].
- `Has0_acc_2` / `Has0_F1_score`: classes `y >= 0` vs `p >= 0` over all clips.
- `Non0_acc_2` / `Non0_F1_score`: drop clips with `y == 0`, then `y > 0` vs `p > 0`.
  F1 is sklearn's `average='weighted'` F1 (per-class F1 weighted by true support).
Papers that say "Acc2/F1" without a qualifier mean the Non0 pair.

Degenerate cases (the same in both implementations; MMSA would give NaN or warn):

- `Corr` is 0.0 when predictions or labels are constant (no linear relation measurable).
- A class absent from both truth and predictions has support 0 and so weight 0 in the F1; a class
  present in truth but never predicted has F1 0 (sklearn's `zero_division=0`).
- If every label is exactly 0, the Non0 subset is empty and `Non0_acc_2` and `Non0_F1_score` are
  0.0 (not NaN, so logs, checkpoint selection and early stopping stay well defined).

Both implementations work on float32 values, as MMSA does (its labels and predictions are float32
arrays): a label stored as 2.4999999 in float64 is 2.5 in float32 and rounds to 2 in both.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tf_keras as keras

METRIC_KEYS = (
    "Has0_acc_2",
    "Has0_F1_score",
    "Non0_acc_2",
    "Non0_F1_score",
    "Mult_acc_5",
    "Mult_acc_7",
    "MAE",
    "Corr",
)

# Below this relative spread (sum of squared deviations / sum of squares) the streaming metric
# treats a side as constant. Why: float32 sums cancel in sum(x^2) - sum(x)^2/n, leaving noise of
# about 1e-6 relative for a few hundred batches; a real spread that small is not measurable.
_CONSTANT_RTOL = 1e-5


# ----------------------------------------------------------------------------------------------
# numpy reference
# ----------------------------------------------------------------------------------------------


def _as_clip_vector(values, name: str) -> np.ndarray:
    """Returns `values` as a 1-D float32 array, or raises ValueError naming the problem."""
    try:
        array = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be numeric, got {type(values).__name__}: {error}") from None
    if array.ndim == 0:
        raise ValueError(f"{name} must be a vector of per-clip values, got a scalar")
    # (N,), (N, 1) and MulT's (N, 1, 1) are one value per clip; (N, 2) is not.
    if any(dim != 1 for dim in array.shape[1:]):
        raise ValueError(
            f"{name} must have shape (N,) or (N, 1) (one value per clip), got {array.shape}"
        )
    array = array.reshape(-1)
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(
            f"{name} has {bad.size} non-finite value(s) (NaN/inf) at positions {bad[:5].tolist()}"
        )
    return array


def _weighted_f1(true_class: np.ndarray, pred_class: np.ndarray) -> float:
    """sklearn's `f1_score(average='weighted', zero_division=0)` for boolean classes."""
    total = true_class.size
    if total == 0:
        return 0.0
    f1_weighted = 0.0
    for label in (False, True):
        support = np.sum(true_class == label)
        if support == 0:
            continue  # weight 0: a class only predicted, never true, adds nothing
        true_pos = np.sum((pred_class == label) & (true_class == label))
        predicted = np.sum(pred_class == label)
        precision = true_pos / predicted if predicted else 0.0
        recall = true_pos / support
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        f1_weighted += f1 * support / total
    return float(f1_weighted)


def msa_metrics(y_true, y_pred) -> dict[str, float]:
    """Computes the MMSA regression metrics over a whole split.

    Args:
      y_true: labels, shape (N,) or (N, 1), any float dtype, finite; typically in [-3, 3].
      y_pred: predictions, same number of clips, finite; may lie outside [-3, 3].

    Returns:
      dict with float values and exactly the keys of `METRIC_KEYS`:
      `Has0_acc_2, Has0_F1_score, Non0_acc_2, Non0_F1_score, Mult_acc_5, Mult_acc_7, MAE, Corr`.
      Accuracies and F1 are fractions in [0, 1] (MMSA reports them the same way).

    Raises:
      ValueError: empty input, different lengths, not one value per clip, or NaN/inf values.

    Example:
      >>> m = msa_metrics([1.0, -2.0, 0.0], [0.8, -1.2, 0.3])
      >>> m["Non0_acc_2"], round(m["MAE"], 4)
      (1.0, 0.4333)
    """
    labels = _as_clip_vector(y_true, "y_true")
    preds = _as_clip_vector(y_pred, "y_pred")
    if labels.size != preds.size:
        raise ValueError(f"y_true has {labels.size} clips but y_pred has {preds.size}")
    if labels.size == 0:
        raise ValueError("msa_metrics needs at least one clip, got 0")

    # float32 values (as MMSA) for the class decisions; float64 for the sums.
    y64 = labels.astype(np.float64)
    p64 = preds.astype(np.float64)
    mae = float(np.mean(np.abs(p64 - y64)))
    y_dev = y64 - y64.mean()
    p_dev = p64 - p64.mean()
    denominator = np.sqrt(np.sum(y_dev**2) * np.sum(p_dev**2))
    corr = float(np.sum(y_dev * p_dev) / denominator) if denominator > 0 else 0.0

    def rounded_class_accuracy(bound: float) -> float:
        # np.round is half to even: 2.5 -> 2, 0.5 -> 0, -2.5 -> -2.
        y_cls = np.round(np.clip(labels, -bound, bound))
        p_cls = np.round(np.clip(preds, -bound, bound))
        return float(np.mean(y_cls == p_cls))

    has0_true, has0_pred = labels >= 0, preds >= 0
    non_zero = labels != 0
    non0_true, non0_pred = labels[non_zero] > 0, preds[non_zero] > 0
    return {
        "Has0_acc_2": float(np.mean(has0_true == has0_pred)),
        "Has0_F1_score": _weighted_f1(has0_true, has0_pred),
        "Non0_acc_2": float(np.mean(non0_true == non0_pred)) if non_zero.any() else 0.0,
        "Non0_F1_score": _weighted_f1(non0_true, non0_pred),
        "Mult_acc_5": rounded_class_accuracy(2.0),
        "Mult_acc_7": rounded_class_accuracy(3.0),
        "MAE": mae,
        "Corr": corr,
    }


# ----------------------------------------------------------------------------------------------
# streaming Keras metric
# ----------------------------------------------------------------------------------------------


def _binary_weighted_f1(confusion: tf.Tensor) -> tf.Tensor:
    """Weighted F1 from a (2, 2) matrix of weighted counts `[true_class, pred_class]`."""
    true_neg, false_pos = confusion[0, 0], confusion[0, 1]
    false_neg, true_pos = confusion[1, 0], confusion[1, 1]
    # F1 = 2TP / (2TP + FP + FN) equals 2PR / (P + R), and is 0 when the class is never predicted.
    f1_pos = tf.math.divide_no_nan(2.0 * true_pos, 2.0 * true_pos + false_pos + false_neg)
    f1_neg = tf.math.divide_no_nan(2.0 * true_neg, 2.0 * true_neg + false_neg + false_pos)
    support_pos = true_pos + false_neg
    support_neg = true_neg + false_pos
    return tf.math.divide_no_nan(
        support_pos * f1_pos + support_neg * f1_neg, support_pos + support_neg
    )


def _confusion(true_class: tf.Tensor, pred_class: tf.Tensor, weight: tf.Tensor) -> tf.Tensor:
    """(2, 2) weighted counts `[true_class, pred_class]` from 0/1 float vectors; no scatter ops."""
    true_onehot = tf.stack([1.0 - true_class, true_class], axis=1)  # (B, 2)
    pred_onehot = tf.stack([1.0 - pred_class, pred_class], axis=1)  # (B, 2)
    return tf.einsum("bi,bj->ij", true_onehot * weight[:, None], pred_onehot)  # (2, 2)


class MSAMetrics(keras.metrics.Metric):
    """All eight MSA metrics as one streaming metric with a dict `result()`.

    The state is sufficient statistics only (weighted counts, sums, sums of squares and cross
    products, two binary confusion matrices, hit counts for acc5/acc7), every one a float32
    variable that is additive. So the metric works inside `jit_compile=True` and under any
    `tf.distribute` strategy: Keras creates metric variables with SUM aggregation and
    `result()` reads the replica-summed state. float32 (not float64) because TPUs have none;
    for a split of ~5k clips the float32 Corr agrees with `msa_metrics` to ~1e-5.

    tf_keras flattens a dict-valued metric into the logs (`Model.get_metrics_result`), so
    `model.compile(metrics=[MSAMetrics()])` yields `MAE`, `Non0_acc_2`, ... in
    `evaluate(return_dict=True)` and `val_MAE`, `val_Non0_acc_2`, ... in `fit` logs.

    Degenerate cases follow `msa_metrics` (see the module docstring). `Corr` is also 0.0 when
    a side's sum of squared deviations is below 1e-5 of its sum of squares, since float32
    sums cannot resolve a spread that small.

    Args:
      name: metric name (it does not appear in the logs: the dict keys do).
      dtype: ignored: the metric and its state are always float32.

    Example:
      >>> metric = MSAMetrics()
      >>> metric.update_state([[1.0], [-2.0]], [[0.8], [-1.2]])
      >>> float(metric.result()["Non0_acc_2"])
      1.0
    """

    def __init__(self, name: str = "msa_metrics", dtype=None, **kwargs):
        # Always float32, whatever the global policy: under mixed_bfloat16 / mixed_float16 a
        # metric of the policy's dtype gets AutoCastVariable state, and reading that inside
        # `variable_sync_on_read_context` (TPU epoch ends and evaluate; GPUs under XLA every
        # step, where MirroredStrategy skips merge_call) raises NotImplementedError.
        del dtype
        super().__init__(name=name, dtype="float32", **kwargs)

        def state(state_name, shape=()):
            return self.add_weight(state_name, shape=shape, initializer="zeros", dtype=tf.float32)

        self.count = state("count")  # sum of weights over all clips
        self.abs_error_sum = state("abs_error_sum")
        self.pred_sum = state("pred_sum")
        self.true_sum = state("true_sum")
        self.pred_sq_sum = state("pred_sq_sum")
        self.true_sq_sum = state("true_sq_sum")
        self.cross_sum = state("cross_sum")
        self.acc5_hits = state("acc5_hits")
        self.acc7_hits = state("acc7_hits")
        self.has0_confusion = state("has0_confusion", (2, 2))  # [true_class, pred_class]
        self.non0_confusion = state("non0_confusion", (2, 2))

    def reset_state(self):
        # Keras' default assigns a scalar 0, which does not fit the (2, 2) confusion matrices.
        for variable in self.variables:
            variable.assign(tf.zeros_like(variable))

    def update_state(self, y_true, y_pred, sample_weight=None):
        """Adds a batch.

        Args:
          y_true: labels, shape (B, 1) or (B,), any float dtype.
          y_pred: predictions, same number of clips.
          sample_weight: optional (B,) or (B, 1) per-clip weights; weight 0 drops a clip, e.g. the
            padding clips of a fixed-size last batch (static shapes on TPU).
        """
        labels = tf.reshape(tf.cast(y_true, tf.float32), [-1])  # (B,)
        preds = tf.reshape(tf.cast(y_pred, tf.float32), [-1])  # (B,)
        if sample_weight is None:
            weight = tf.ones_like(labels)
        else:
            weight = tf.reshape(tf.cast(sample_weight, tf.float32), [-1])
            weight = tf.broadcast_to(weight, tf.shape(labels))

        def weighted_sum(values):
            return tf.reduce_sum(weight * values)

        def hits(bound):
            # tf.round is half to even, like np.round.
            same = tf.equal(
                tf.round(tf.clip_by_value(labels, -bound, bound)),
                tf.round(tf.clip_by_value(preds, -bound, bound)),
            )
            return weighted_sum(tf.cast(same, tf.float32))

        non_zero_weight = weight * tf.cast(tf.not_equal(labels, 0.0), tf.float32)
        updates = [
            (self.count, tf.reduce_sum(weight)),
            (self.abs_error_sum, weighted_sum(tf.abs(preds - labels))),
            (self.pred_sum, weighted_sum(preds)),
            (self.true_sum, weighted_sum(labels)),
            (self.pred_sq_sum, weighted_sum(preds * preds)),
            (self.true_sq_sum, weighted_sum(labels * labels)),
            (self.cross_sum, weighted_sum(preds * labels)),
            (self.acc5_hits, hits(2.0)),
            (self.acc7_hits, hits(3.0)),
            (
                self.has0_confusion,
                _confusion(
                    tf.cast(labels >= 0.0, tf.float32), tf.cast(preds >= 0.0, tf.float32), weight
                ),
            ),
            (
                self.non0_confusion,
                _confusion(
                    tf.cast(labels > 0.0, tf.float32),
                    tf.cast(preds > 0.0, tf.float32),
                    non_zero_weight,
                ),
            ),
        ]
        for variable, value in updates:
            variable.assign_add(value)

    def result(self) -> dict[str, tf.Tensor]:
        """Returns a dict of eight float32 scalars keyed by `METRIC_KEYS`."""
        count = self.count
        # Squared deviations and co-deviation from plain sums (sum x^2 - (sum x)^2 / n).
        pred_ssd = self.pred_sq_sum - tf.math.divide_no_nan(self.pred_sum * self.pred_sum, count)
        true_ssd = self.true_sq_sum - tf.math.divide_no_nan(self.true_sum * self.true_sum, count)
        co_dev = self.cross_sum - tf.math.divide_no_nan(self.pred_sum * self.true_sum, count)
        pred_varies = pred_ssd > _CONSTANT_RTOL * self.pred_sq_sum
        true_varies = true_ssd > _CONSTANT_RTOL * self.true_sq_sum
        corr = tf.math.divide_no_nan(
            co_dev, tf.sqrt(tf.maximum(pred_ssd, 0.0) * tf.maximum(true_ssd, 0.0))
        )
        corr = tf.where(pred_varies & true_varies, tf.clip_by_value(corr, -1.0, 1.0), 0.0)

        has0, non0 = self.has0_confusion, self.non0_confusion
        return {
            "Has0_acc_2": tf.math.divide_no_nan(tf.linalg.trace(has0), tf.reduce_sum(has0)),
            "Has0_F1_score": _binary_weighted_f1(has0),
            "Non0_acc_2": tf.math.divide_no_nan(tf.linalg.trace(non0), tf.reduce_sum(non0)),
            "Non0_F1_score": _binary_weighted_f1(non0),
            "Mult_acc_5": tf.math.divide_no_nan(self.acc5_hits, count),
            "Mult_acc_7": tf.math.divide_no_nan(self.acc7_hits, count),
            "MAE": tf.math.divide_no_nan(self.abs_error_sum, count),
            "Corr": corr,
        }
