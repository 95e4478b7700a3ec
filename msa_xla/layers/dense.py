"""Dense whose bias gradient is cheap inside XLA (see `msa_xla.kernels.projection`)."""

import tensorflow as tf
import tf_keras as keras

from msa_xla.kernels import linear


@keras.saving.register_keras_serializable(package="msa_xla")
class Dense(keras.layers.Dense):
    """`keras.layers.Dense` (same weights, config and checkpoints) computed by `linear`.

    Inside a jit-compiled step the bias gradient comes out of the weight-gradient matmul
    instead of a column sum; elsewhere this is exactly `keras.layers.Dense`.

    Example:
      >>> Dense(8, activation="relu")(tf.ones((2, 5, 4))).shape
      TensorShape([2, 5, 8])
    """

    def call(self, inputs):
        if (isinstance(inputs, (tf.SparseTensor, tf.RaggedTensor))
                or inputs.shape.rank is None):
            return super().call(inputs)
        inputs = tf.cast(inputs, self.compute_dtype)
        kernel = tf.cast(self.kernel, self.compute_dtype)
        bias = tf.cast(self.bias, self.compute_dtype) if self.use_bias else None
        outputs = linear(inputs, kernel, bias)
        return self.activation(outputs) if self.activation is not None else outputs
