"""The trainer's optimizer: tf_keras' Adam, each dense update one fused op.

tf_keras' `Adam.update_step` writes the update of every variable as ~30 small ops (step count,
bias corrections, the two moments, the step), so a model's train step carries ~30 ops per
variable that TensorFlow must trace and XLA must compile before the first step runs: MulT at
MMSA's defaults has 459 variables. `ResourceApplyAdam` is the same update as one op (TensorFlow's
CPU/GPU kernels and XLA's lowering compute tf_keras' formula:
`m += (g - m)(1 - b1); v += (g^2 - v)(1 - b2); w -= lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps)`),
on the same slot variables, so checkpoints and `.keras` files are unchanged. Sparse gradients and
`amsgrad` keep tf_keras' own update. Measured: `python tools/bench_trace.py`.
"""

import tensorflow as tf
import tf_keras as keras

from msa_xla.runtime import compat


@keras.saving.register_keras_serializable(package="msa_xla")
class FusedAdam(keras.optimizers.Adam):
    """`keras.optimizers.Adam` whose dense update is one `ResourceApplyAdam` per variable.

    Example:
      >>> w = tf.Variable([1.0, -1.0])
      >>> reference, fused = keras.optimizers.Adam(0.1), FusedAdam(0.1)
      >>> w2 = tf.Variable([1.0, -1.0])
      >>> for _ in range(3):
      ...     _ = reference.apply_gradients([(tf.constant([0.5, 2.0]), w)])
      ...     _ = fused.apply_gradients([(tf.constant([0.5, 2.0]), w2)])
      >>> bool(np.abs(w.numpy() - w2.numpy()).max() < 1e-5)  # the same update, rounded apart
      True
    """

    def update_step(self, gradient, variable):
        if isinstance(gradient, tf.IndexedSlices) or self.amsgrad:
            return super().update_step(gradient, variable)
        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        m, v = compat.adam_moments(self, variable)
        # tf_keras' Adam divides by sqrt(v) + epsilon, as this op does (not by sqrt(v + eps)).
        return tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=m.handle, v=v.handle,
            beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step),
            lr=tf.cast(self.learning_rate, dtype), beta1=beta_1, beta2=beta_2,
            epsilon=tf.cast(self.epsilon, dtype), grad=gradient)
