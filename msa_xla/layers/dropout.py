"""Dropout whose mask is cheap to draw inside an XLA computation.

Why: on CPU, XLA expands TF's random ops into a slow Philox loop; with keras' dropout the
spec model's XLA train step was slower than the same step without XLA (tools/bench.py: jit /
no-jit 0.80 before this layer, 1.22 after; the commit messages name the runs).

Inside a jit-compiled function this layer instead hashes a counter: each 32-bit word is
the element counter pushed through two keyed rounds of the `lowbias32` integer hash
(xor-shift-multiply; C. Wellons, "Hash function prospector"; `msa_xla.kernels.hashing`, shared
with the attention core's dropout), keyed by two words drawn once per call from the layer's
random generator, and gives two keep/drop decisions from its two 16-bit halves (element i and
element i + size/2). That is ~7 vectorisable integer ops per element instead of a Philox
round trip. Outside XLA it is exactly `keras.layers.Dropout`
(TF's CPU/GPU random kernels are fast there).

The keep probability is quantised to 1/65536 (rate 0.1 drops with probability
6554/65536 = 0.100006) and kept values are scaled by the exact inverse of the quantised keep
probability, so the expectation of every element is unchanged.
"""

from __future__ import annotations

import numbers

import tensorflow as tf
import tf_keras as keras

from msa_xla.kernels.hashing import (
    LEVELS,
    hash_words,
    keep_threshold,
    quantized_keep_probability,
)
from msa_xla.runtime.compat import in_xla_context

__all__ = ["Dropout", "hashed_keep_mask", "quantized_keep_probability"]


def hashed_keep_mask(shape, rate, key):
    """Boolean keep mask of static `shape` (P(keep) = 1 - round(rate * 2^16) / 2^16).

    Args:
      shape: static shape (a list of ints) of the mask.
      rate: drop probability in [0, 1).
      key: int32/int64 tensor of 2 values; the same key gives the same mask.

    Returns:
      bool tensor of `shape`.
    """
    size = int(tf.TensorShape(shape).num_elements())
    words = (size + 1) // 2
    x = hash_words(tf.range(words, dtype=tf.int32), key)
    # Element i takes the low half of word i, element words + i its high half: a broadcast
    # shift, so XLA fuses it into the select that applies the mask (an interleaving stack of
    # the halves was a separate concatenate per call, ~4% of the spec model's step).
    shifts = tf.constant([[0], [16]], tf.uint32)
    halves = tf.bitwise.bitwise_and(tf.bitwise.right_shift(x[None, :], shifts), LEVELS - 1)
    threshold = tf.constant(keep_threshold(rate), tf.uint32)
    keep = tf.reshape(halves >= threshold, [-1])  # (2 * words,)
    if 2 * words != size:
        keep = keep[:size]
    return tf.reshape(keep, shape)


@keras.saving.register_keras_serializable(package="msa_xla")
class Dropout(keras.layers.Dropout):
    """`keras.layers.Dropout` with a cheap counter-hash mask inside XLA (see the module docstring).

    Same arguments, config and behaviour as `keras.layers.Dropout`; inference is the identity.
    The per-call key comes from the layer's random generator: with
    `keras.backend.experimental.enable_tf_random_generator()` (the trainer does this) it is
    seeded, advances every call and is checkpointed, so runs and resumes are reproducible.

    Example:
      >>> layer = Dropout(0.1)
      >>> x = tf.ones([4, 8])
      >>> bool(tf.reduce_all(layer(x, training=False) == x))
      True
      >>> step = tf.function(lambda x: layer(x, training=True), jit_compile=True)
      >>> kept = step(tf.ones([64, 1024]))   # hashed mask: ~90% kept, scaled by 1/0.899994
      >>> 0.88 < float(tf.reduce_mean(tf.cast(kept > 0, tf.float32))) < 0.92
      True
    """

    def call(self, inputs, training=None):
        rate_is_number = isinstance(self.rate, numbers.Real)
        if (not rate_is_number or self.rate == 0 or self.noise_shape is not None
                or quantized_keep_probability(self.rate) <= 0  # rate ~1: drops everything
                or not inputs.shape.is_fully_defined() or not in_xla_context()):
            return super().call(inputs, training=training)
        if training is None:
            training = keras.backend.learning_phase()

        def dropped():
            keep = hashed_keep_mask(inputs.shape, self.rate, self.draw_key())
            # Scaled in float32: 1/0.899994 is 1.109375 in bfloat16, which would shrink every
            # kept value's expectation by 0.16% per layer.
            scale = 1.0 / quantized_keep_probability(self.rate)
            scaled = tf.cast(tf.cast(inputs, tf.float32) * scale, inputs.dtype)
            return tf.where(keep, scaled, tf.zeros_like(inputs))

        return tf.__internal__.smart_cond.smart_cond(training, dropped,
                                                     lambda: tf.identity(inputs))

    def draw_key(self):
        """Two fresh 32-bit key words for a hashed mask (int tensor of 2 values).

        Drawn from the layer's random generator, so a layer that only supplies keys (e.g. the
        attention core's dropout in `msa_xla.models.mult`) is seeded and checkpointed as this
        layer is (`msa_xla.trainer.checkpointing.rng_state_variables`).
        """
        seed = self._random_generator.make_seed_for_stateless_op()
        if seed is not None:  # tf.random.Generator (checkpointed) or a fixed stateless seed
            return tf.convert_to_tensor(seed)
        # Legacy stateful RNG (Keras' default): a stateful op draws the key, 2 values a call
        # (no op seed: XLA ignores it, as it does for keras.layers.Dropout there).
        return tf.random.uniform([2], maxval=tf.int32.max, dtype=tf.int32)
