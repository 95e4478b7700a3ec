"""Every private TensorFlow / tf_keras name the package relies on, in one place.

A TensorFlow upgrade that renames one of these breaks this file, not five. Each entry says what
it is for and what happens without it.
"""

import tensorflow as tf

try:  # Private but stable since TF 1.x.
    from tensorflow.python.ops.control_flow_util import GraphOrParentsInXlaContext
except ImportError:  # pragma: no cover - without it: never "inside XLA" (the plain ops run)
    GraphOrParentsInXlaContext = None


def in_xla_context() -> bool:
    """True while tracing inside an XLA computation: a jit-compiled function (e.g.
    `compile(jit_compile=True)`) or a TPU replicated computation."""
    if GraphOrParentsInXlaContext is None or tf.executing_eagerly():
        return False
    return GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def _graphs_and_contexts():
    """(graph, control-flow context) pairs from the current graph outwards."""
    graph = tf.compat.v1.get_default_graph()
    while graph is not None:
        context = graph._get_control_flow_context()
        while context is not None:
            yield graph, context
            context = context.outer_context
        graph = getattr(graph, "outer_graph", None)


def xla_target_platform() -> str | None:
    """The platform of the XLA computation being traced: 'TPU', 'GPU', 'CPU'; None outside XLA.

    Why: some rewrites exist for XLA:CPU only (kernels/projection.py) and must not run inside a
    TPU or GPU step. `in_xla_context()` alone is also true inside TPU replication. A TPU
    computation is traced inside a `TPUReplicateContext`; a jit-compiled function runs on the
    device of its device scope (MirroredStrategy and OneDeviceStrategy set one per replica),
    or, without one, on TF's default device: the first GPU if there is one.

    Example:
      >>> xla_target_platform() is None   # eager: not tracing XLA
      True
    """
    if tf.executing_eagerly() or not in_xla_context():
        return None
    for _, context in _graphs_and_contexts():
        if type(context).__name__ == "TPUReplicateContext":
            return "TPU"
    device = tf.raw_ops.NoOp().device  # the device scope in force (a no-op is pruned)
    if device:
        device_type = tf.DeviceSpec.from_string(device).device_type
        if device_type in ("TPU", "GPU", "CPU"):
            return device_type
    return "GPU" if tf.config.list_logical_devices("GPU") else "CPU"


def fresh_collective_keys() -> None:
    """Gives the next MirroredStrategy built in this process collective keys of its own.

    Why: every MirroredStrategy starts its collective instance keys at the same base, so a
    second strategy in one process (a notebook training twice, the tests) can pair its
    all-reduces with the first one's ("Shape mismatch in the collective instance ...").
    TF's own tests move the base the same way (distribute/strategy_combinations.py).
    """
    tf.distribute.MirroredStrategy._collective_key_base += 100000
