"""Names for the ops of a custom gradient, so a profile can tell whose backward pass they are.

TF names the gradient ops of its own ops `gradient_tape/<forward scope>/...`; a
`tf.custom_gradient`'s backward function runs with no scope at all (its ops come out as
`MatMul_12`, unattributable in a profile). The kernels capture the forward scope and open the
same name TF would have used:

    scope = gradient_scope()          # in the forward function
    def grad(dy):
        with tf.name_scope(scope):    # -> "gradient_tape/<forward scope>/"
            ...

msa_xla/profiling/parts.py reads these names (backward pass, and the forward's part and kind).
"""

import tensorflow as tf


def gradient_scope() -> str:
    """The absolute name scope (trailing '/') for the backward ops of the current scope."""
    forward = tf.get_current_name_scope()
    return f"gradient_tape/{forward}/" if forward else "gradient_tape/"
