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


def skip_autograph(package: str) -> None:
    """Tells AutoGraph to call `package`'s functions as they are, as it does tf_keras' own.

    Why: inside a `tf.function` AutoGraph rewrites the source of every function it meets that
    is not on its list of graph-ready libraries (TensorFlow, tf_keras, numpy, ...): every layer
    `call`, the metric and the input parser were parsed and rewritten at each process's first
    trace: a tiny model's first trainer run took 37 s with that, 25 s without (medians of three,
    AMD EPYC, TF 2.21). msa_xla's code is written for graph mode (no Python `if`/`for`/`and` on
    tensors; tf.cond / tf.while_loop where a tensor decides), so it joins that list. A user's
    own subclass, defined in the user's module, is still converted. Without the hook (a TF
    that renamed it): only slower traces.
    """
    try:
        from tensorflow.python.autograph.core import config, config_lib
    except ImportError:  # pragma: no cover
        return
    rule = config_lib.DoNotConvert(package)
    if not any(getattr(r, "_prefix", None) == package and type(r) is type(rule)
               for r in config.CONVERSION_RULES):
        config.CONVERSION_RULES = (rule, *config.CONVERSION_RULES)


def fresh_collective_keys() -> None:
    """Gives the next MirroredStrategy built in this process collective keys of its own.

    Why: every MirroredStrategy starts its collective instance keys at the same base, so a
    second strategy in one process (a notebook training twice, the tests) can pair its
    all-reduces with the first one's ("Shape mismatch in the collective instance ...").
    TF's own tests move the base the same way (distribute/strategy_combinations.py).
    """
    tf.distribute.MirroredStrategy._collective_key_base += 100000


# ---- tf_keras internals used by the trainer ----------------------------------------------------
def start_fit_at(model, epoch: int, step_in_epoch: int) -> None:
    """Makes the next `model.fit` start at (`epoch`, `step_in_epoch`): a mid-epoch resume.

    Why: `fit(initial_epoch=...)` can only start at an epoch boundary. tf_keras' DataHandler asks
    `model._maybe_load_initial_counters_from_ckpt` where to start (the hook BackupAndRestore
    uses); without it a run resumed mid-epoch would train that epoch's first steps again.
    """
    model._maybe_load_initial_counters_from_ckpt = (
        lambda steps_per_epoch, initial_epoch, **kwargs: (epoch, step_in_epoch))


def all_layers(model):
    """Every layer of `model`, nested ones included, the model first (tf_keras' own walk)."""
    return model._flatten_layers(include_self=True, recursive=True)


def dropout_generator(layer):
    """The tf.random.Generator behind a layer's dropout noise, or None.

    Why: tf_keras leaves it out of checkpoints; the trainer checkpoints its state itself.
    """
    return getattr(getattr(layer, "_random_generator", None), "_generator", None)


def steps_per_execution(model) -> int:
    """The steps one call of the compiled train function runs (`compile(steps_per_execution=)`)."""
    value = getattr(model, "_steps_per_execution", None)
    return int(value.numpy()) if value is not None else 1


def keep_logs_as_tensors(callback) -> None:
    """Tells tf_keras not to copy `callback`'s logs to numpy after every execution.

    Why: that copy is a device->host read per execution, which on a TPU stalls the pipeline.
    `Callback.__init__` sets the flag False on the instance, so call this after it.
    """
    callback._supports_tf_logs = True


def wait_for_device() -> None:
    """Blocks until the eager context's pending (asynchronous) device work is done."""
    from tensorflow.python.eager import context

    context.async_wait()


def adam_moments(optimizer, variable):
    """(first moment, second moment) slot variables of tf_keras' Adam for `variable`.

    Why: the fused update (trainer/optimizer.py) writes the same slots tf_keras' Adam creates,
    so checkpoints and `.keras` files keep their layout; tf_keras offers no public lookup.
    """
    index = optimizer._index_dict[optimizer._var_key(variable)]
    return optimizer._momentums[index], optimizer._velocities[index]
