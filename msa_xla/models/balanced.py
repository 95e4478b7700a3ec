"""BalancedMSAModel: unimodal auxiliary heads + on-the-fly gradient modulation (OGM-GE).

OGM-GE (Peng et al., CVPR 2022) slows the modality that dominates training so the others
catch up. Adapted here to regression: each modality's unimodal head gets a score
s_m = 1 / (MAE_m + eps) on the batch; the ratio of a modality's score to the mean score of
the others decides its coefficient

    k_m = 1 - tanh(alpha * (ratio_m - 1))   if ratio_m > 1 (dominant), else 1,

and the gradients of that modality's encoder are multiplied by k_m. With Gaussian
enhancement (GE), noise N(0, std(g)) is added to the modulated gradients to restore the
generalisation that scaling takes away. Everything is tensor math with no data-dependent
shapes or Python branches on tensors, so the step compiles with XLA.
"""

import tensorflow as tf
import tf_keras as keras

from msa_xla.errors import UserError
from msa_xla.models.pooled import PooledFusionModel
from msa_xla.options import MODALITIES

_EPS = 1e-6


def modulation_coefficients(unimodal_errors, alpha):
    """(M,) per-modality MAE -> (M,) gradient coefficients in (0, 1]; see the module doc."""
    errors = tf.stack([tf.cast(e, tf.float32) for e in unimodal_errors])
    scores = 1.0 / (errors + _EPS)
    count = tf.cast(tf.size(scores), tf.float32)
    mean_of_others = (tf.reduce_sum(scores) - scores) / (count - 1.0)
    ratio = scores / mean_of_others
    return tf.stop_gradient(
        tf.where(ratio > 1.0, 1.0 - tf.tanh(alpha * (ratio - 1.0)), tf.ones_like(ratio)))


@keras.saving.register_keras_serializable(package="msa_xla")
class BalancedMSAModel(PooledFusionModel):
    """Early-pooling MSA model trained with balanced multimodal learning.

    Besides the fused prediction, each pooled modality vector feeds its own Dense(1)
    head; training minimises `loss(fused) + aux_weight * sum_m MAE(unimodal_m)`, and the
    dominant modality's encoder gradients are scaled down (OGM-GE, module doc). Inference
    returns only the fused prediction. Logs `coeff_text`, `coeff_audio`, `coeff_video`.

    Args: those of MSAModel, plus
      alpha: modulation strength (0 disables modulation).
      aux_weight: weight of the unimodal losses.
      gaussian_enhancement: add N(0, std(g)) noise to modulated gradients.
      noise_seed: seed of the enhancement noise (stateless: same step -> same noise).

    Example:
      >>> model = BalancedMSAModel(seq_len=20, text_dim=300, audio_dim=74, video_dim=47,
      ...                          model_dim=64)
      >>> model.compile(optimizer="adam", loss="mae")
    """

    def __init__(self, *args, alpha=0.5, aux_weight=1.0, gaussian_enhancement=True,
                 noise_seed=0, **kwargs):
        super().__init__(*args, **kwargs)
        if alpha < 0 or aux_weight < 0:
            raise UserError(f"alpha={alpha} and aux_weight={aux_weight} must be >= 0")
        self.alpha, self.aux_weight = float(alpha), float(aux_weight)
        self.gaussian_enhancement, self.noise_seed = bool(gaussian_enhancement), int(noise_seed)
        self.unimodal_heads = [keras.layers.Dense(1, dtype="float32", name=f"{m}_head")
                               for m in MODALITIES]
        # Metrics, not raw logs: aggregated correctly over replicas and averaged over the epoch.
        self.coefficient_trackers = [keras.metrics.Mean(name=f"coeff_{m}") for m in MODALITIES]

    def forward(self, sequences, masks, training=None):
        pooled = self.encode(sequences, masks, training=training)
        unimodal = [head(p) for head, p in zip(self.unimodal_heads, pooled)]
        return self.fuse(pooled, training=training), {"unimodal": unimodal}

    def _modality_of_variables(self):
        """For each trainable variable, the index of the modality encoder owning it, or -1."""
        owner = {}
        for index, encoder in enumerate(self.encoders):
            for variable in encoder.trainable_variables:
                owner[variable.ref()] = index
        return [owner.get(v.ref(), -1) for v in self.trainable_variables]

    def _modulate(self, grads, coefficients):
        owners = self._modality_of_variables()
        modulated = list(grads)
        targets = [i for i, (g, m) in enumerate(zip(grads, owners)) if g is not None and m >= 0]
        if self.alpha == 0 or not targets:
            return modulated
        if self.gaussian_enhancement:
            # One stateless draw for all encoder gradients (one RNG op keeps the XLA program
            # small); seeded by the step, so a resumed run draws the same noise.
            variables = self.trainable_variables  # static shapes, even when a grad has none
            sizes = [variables[i].shape.num_elements() for i in targets]
            seed = tf.stack([tf.constant(self.noise_seed, tf.int64),
                             tf.cast(self.optimizer.iterations, tf.int64)])
            noises = tf.split(tf.random.stateless_normal([sum(sizes)], seed), sizes)
        for j, i in enumerate(targets):
            grad = grads[i]
            coeff = tf.cast(coefficients[owners[i]], grad.dtype)
            new_grad = grad * coeff
            if self.gaussian_enhancement:
                noise = tf.reshape(tf.cast(noises[j], grad.dtype), variables[i].shape)
                # Only the slowed-down (dominant) modality gets the enhancement noise.
                new_grad += tf.cast(coeff < 1.0, grad.dtype) * noise * tf.math.reduce_std(grad)
            modulated[i] = new_grad
        return modulated

    def compute_gradients(self, x, y, sample_weight=None):
        """Forward, loss and modulated gradients: everything of the step but the update.

        Returns (loss, y_pred, grads, {"coefficients": (3,) tensor}). The trainer XLA-compiles
        this per replica where the update must stay outside XLA (several CPU replicas), so it
        touches no metric variable: `track_step_extras` records the coefficients afterwards.
        """
        y_true = tf.reshape(tf.cast(y, tf.float32), [-1, 1])
        optimizer = self.optimizer
        scales_loss = isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer)
        with tf.GradientTape() as tape:
            sequences, masks = self._unpack(x)
            y_pred, extras = self.forward(sequences, masks, training=True)
            errors = [tf.reduce_mean(tf.abs(y_true - u)) for u in extras["unimodal"]]
            loss = self.compute_loss(x, y, y_pred, sample_weight)
            loss += self.aux_weight * tf.add_n(errors) / self.distribute_strategy.num_replicas_in_sync
            tape_loss = optimizer.get_scaled_loss(loss) if scales_loss else loss
        grads = tape.gradient(tape_loss, self.trainable_variables)
        if scales_loss:
            grads = optimizer.get_unscaled_gradients(grads)
        coefficients = modulation_coefficients(errors, self.alpha)
        return (loss, y_pred, self._modulate(grads, coefficients),
                {"coefficients": coefficients})

    def track_step_extras(self, extras):
        """Records a step's coefficients (from `compute_gradients`); returns their logs."""
        for tracker, coefficient in zip(self.coefficient_trackers,
                                        tf.unstack(extras["coefficients"])):
            tracker.update_state(coefficient)
        return {tracker.name: tracker.result() for tracker in self.coefficient_trackers}

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        _, y_pred, grads, extras = self.compute_gradients(x, y, sample_weight)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        logs = self.compute_metrics(x, y, y_pred, sample_weight)
        logs.update(self.track_step_extras(extras))
        return logs

    def compute_metrics(self, x, y, y_pred, sample_weight):
        # The coefficients describe training steps only: train_step adds them; evaluation,
        # which never updates them, must not report them (as zeros).
        logs = super().compute_metrics(x, y, y_pred, sample_weight)
        names = {tracker.name for tracker in self.coefficient_trackers}
        return {name: value for name, value in logs.items() if name not in names}

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha, "aux_weight": self.aux_weight,
                "gaussian_enhancement": self.gaussian_enhancement,
                "noise_seed": self.noise_seed}
