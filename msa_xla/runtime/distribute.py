"""One string (and an optional --tpu) -> a `tf.distribute.Strategy`, plus the checks around it.

    strategy = get_strategy("auto", tpu=flags.tpu)   # TPU / mirrored GPUs / one device
    check_global_batch(global_batch_size, strategy.num_replicas_in_sync)
    whole_step_jit = xla_can_compile_collectives(strategy)

Bad combinations and missing hardware raise `StrategyError` with a one-line message, so the
trainer can print it instead of a TensorFlow traceback.
"""

from __future__ import annotations

import json
import os
import re

import tensorflow as tf

from msa_xla.errors import UserError
from msa_xla.options import STRATEGIES
from msa_xla.runtime.compat import fresh_collective_keys


class StrategyError(UserError):
    """A strategy cannot be built here, or the run configuration does not fit it (one line)."""


# ----------------------------------------------------------------------------------------------
# building a strategy
# ----------------------------------------------------------------------------------------------


def _tpu_strategy(tpu: str | None) -> tf.distribute.Strategy:
    """Connects to `tpu` ('local' = attached to this VM) and builds a TPUStrategy."""
    tpu = tpu or "local"
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    except (ValueError, OSError) as error:
        # A named TPU is looked up via the GCE metadata server: off GCE that lookup fails with
        # urllib's URLError (an OSError); a name it cannot parse gives ValueError.
        raise StrategyError(
            f"no TPU found for --tpu={tpu}: cannot resolve it ({_first_line(error)})"
        ) from None
    tf.config.experimental_connect_to_cluster(resolver)  # no-op for 'local'
    try:
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except tf.errors.NotFoundError:
        # What TF 2.21 raises for tpu='local' on a machine without a TPU:
        # "TPUs not found in the cluster. Failed in initialization: No OpKernel ...".
        raise StrategyError(
            f"no TPU found for --tpu={tpu}: this machine has no TPU "
            "(use --strategy=cpu or --strategy=mirrored)"
        ) from None
    return tf.distribute.TPUStrategy(resolver)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _mirrored_strategy() -> tf.distribute.Strategy:
    fresh_collective_keys()  # a second strategy in this process must not share collective keys
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return tf.distribute.MirroredStrategy([device.name for device in gpus])
    # No GPU: mirror over the logical CPUs (tests and laptops split the CPU with
    # tf.config.set_logical_device_configuration before TF initialises).
    cpus = tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([device.name for device in cpus])


def _multi_worker_strategy() -> tf.distribute.Strategy:
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise StrategyError(
            "--strategy=multi_worker needs the TF_CONFIG environment variable "
            '(e.g. {"cluster": {"worker": ["host1:port", "host2:port"]}, '
            '"task": {"type": "worker", "index": 0}})'
        )
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise StrategyError(f"TF_CONFIG is not valid JSON: {error}") from None
    if not isinstance(config, dict) or "cluster" not in config or "task" not in config:
        raise StrategyError("TF_CONFIG must be a JSON object with 'cluster' and 'task' keys")
    return tf.distribute.MultiWorkerMirroredStrategy()


def _one_device_strategy() -> tf.distribute.Strategy:
    device = "/gpu:0" if tf.config.list_logical_devices("GPU") else "/cpu:0"
    return tf.distribute.OneDeviceStrategy(device)


def get_strategy(strategy: str = "auto", tpu: str | None = None) -> tf.distribute.Strategy:
    """Builds the distribution strategy named by one string.

    Args:
      strategy: one of `STRATEGIES`:
        'auto': TPU if `tpu` is given, else MirroredStrategy if more than one GPU, else one device
          (the GPU if there is one, else the CPU).
        'cpu': OneDeviceStrategy('/cpu:0') even when accelerators exist.
        'one_device': OneDeviceStrategy on the first GPU, else the CPU.
        'mirrored': MirroredStrategy over all GPUs; without GPUs over all logical CPU devices.
        'multi_worker': MultiWorkerMirroredStrategy; needs TF_CONFIG.
        'tpu': TPUClusterResolver(tpu or 'local') + connect + initialize + TPUStrategy.
      tpu: TPU name or address (`--tpu=local` for a TPU VM); only with 'auto' or 'tpu'.

    Returns:
      A `tf.distribute.Strategy`.

    Raises:
      StrategyError: unknown name, `tpu` with a non-TPU strategy, no TPU found, missing TF_CONFIG.

    Example:
      >>> get_strategy("cpu").num_replicas_in_sync
      1
    """
    if not isinstance(strategy, str) or strategy.lower() not in STRATEGIES:
        raise StrategyError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    strategy = strategy.lower()
    if tpu and strategy not in ("auto", "tpu"):
        raise StrategyError(
            f"--tpu={tpu} cannot be combined with --strategy={strategy} "
            "(use --strategy=tpu or auto, or drop --tpu)"
        )
    if strategy == "tpu" or (strategy == "auto" and tpu):
        return _tpu_strategy(tpu)
    if strategy == "cpu":
        return tf.distribute.OneDeviceStrategy("/cpu:0")
    if strategy == "one_device":
        return _one_device_strategy()
    if strategy == "mirrored":
        return _mirrored_strategy()
    if strategy == "multi_worker":
        return _multi_worker_strategy()
    # auto without a TPU
    if len(tf.config.list_logical_devices("GPU")) > 1:
        return _mirrored_strategy()
    return _one_device_strategy()


# ----------------------------------------------------------------------------------------------
# checks and facts about a strategy
# ----------------------------------------------------------------------------------------------


def check_global_batch(global_batch_size: int, num_replicas: int) -> int:
    """Checks that the global batch splits evenly over the replicas.

    Args:
      global_batch_size: examples per step over all replicas.
      num_replicas: `strategy.num_replicas_in_sync`.

    Returns:
      The per-replica batch size.

    Raises:
      StrategyError: non-positive sizes, or a batch the replicas do not divide.

    Example:
      >>> check_global_batch(32, 8)
      4
    """
    if global_batch_size < 1 or num_replicas < 1:
        raise StrategyError(
            f"global batch size {global_batch_size} and replicas {num_replicas} must be positive"
        )
    if global_batch_size % num_replicas:
        raise StrategyError(
            f"global batch size {global_batch_size} is not divisible by the "
            f"{num_replicas} replicas"
        )
    return global_batch_size // num_replicas


def is_tpu_strategy(strategy: tf.distribute.Strategy) -> bool:
    """True for `TPUStrategy` (and its experimental predecessor)."""
    return isinstance(strategy, (tf.distribute.TPUStrategy, tf.distribute.experimental.TPUStrategy))


def device_platform(strategy: tf.distribute.Strategy | None = None) -> str:
    """Returns 'TPU', 'GPU' or 'CPU': where `strategy` runs its replicas (or this host's best).

    Args:
      strategy: a strategy, or None to look at the devices visible to TF.

    Example:
      >>> device_platform(get_strategy("cpu"))
      'CPU'
    """
    if strategy is not None:
        if is_tpu_strategy(strategy):
            return "TPU"
        try:
            devices = strategy.extended.worker_devices
        except RuntimeError:  # the default strategy has no worker_devices
            devices = None
        if devices:
            types = {tf.DeviceSpec.from_string(name).device_type for name in devices}
            for platform in ("TPU", "GPU"):
                if platform in types:
                    return platform
            return "CPU"
    for platform in ("TPU", "GPU"):
        if tf.config.list_logical_devices(platform):
            return platform
    return "CPU"


def xla_can_compile_collectives(strategy: tf.distribute.Strategy) -> bool:
    """Whether the whole train step, gradient all-reduce included, can be one XLA computation.

    XLA has no CPU collectives (docs/ARCHITECTURE.md §3: `Collectives are not yet implemented for CPU
    devices when compiling with XLA`), so multi-replica CPU strategies must keep the
    cross-replica reduction and optimizer update outside the XLA cluster. TPU and GPU compile
    it whole; one replica has nothing to reduce.

    Note: with MirroredStrategy over *logical* CPU devices, XLA runs every cluster on CPU:0 and
    cannot touch variables placed on CPU:1 either ("Trying to access resource ... located in
    device CPU:1 from device CPU:0"), so there only un-jitted code may read replica variables.

    Args:
      strategy: the strategy the trainer uses.

    Returns:
      True for TPU, GPU and single-replica strategies; False for multi-replica CPU.
    """
    if strategy.num_replicas_in_sync == 1:
        return True
    return device_platform(strategy) != "CPU"


def _cluster_role(strategy: tf.distribute.Strategy | None) -> tuple[str | None, int, bool]:
    """(task_type, task_id, cluster_has_chief) from the strategy's resolver or TF_CONFIG."""
    if strategy is not None and is_tpu_strategy(strategy):
        return None, 0, False  # TF drives a TPU (slice) from one client process
    resolver = getattr(strategy, "cluster_resolver", None) if strategy is not None else None
    if resolver is not None and resolver.task_type is not None:
        jobs = resolver.cluster_spec().jobs
        return resolver.task_type, int(resolver.task_id or 0), "chief" in jobs
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return None, 0, False
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise StrategyError(f"TF_CONFIG is not valid JSON: {error}") from None
    task = config.get("task", {})
    return task.get("type"), int(task.get("index", 0)), "chief" in config.get("cluster", {})


def worker_index(strategy: tf.distribute.Strategy | None = None) -> int:
    """This process's index among the training hosts: the chief is 0.

    With a 'chief' task in the cluster, workers are numbered from 1 after it; without one,
    worker i is i. Single-process runs (no TF_CONFIG, TPU VM, one device) are worker 0.
    Other task types (evaluator, ps) return their own task index.

    Args:
      strategy: the strategy (its cluster resolver is used if it has one); else TF_CONFIG.

    Example:
      >>> worker_index()
      0
    """
    task_type, task_id, has_chief = _cluster_role(strategy)
    if task_type in (None, "chief"):
        return 0
    if task_type == "worker" and has_chief:
        return task_id + 1
    return task_id


def is_chief(strategy: tf.distribute.Strategy | None = None) -> bool:
    """True on the one process that profiles and writes results.

    The chief is the 'chief' task, or worker 0 when the cluster has no chief, or the only
    process of a single-host run.

    Example:
      >>> is_chief()
      True
    """
    task_type, task_id, has_chief = _cluster_role(strategy)
    if task_type is None or task_type == "chief":
        return True
    return task_type == "worker" and task_id == 0 and not has_chief


# ----------------------------------------------------------------------------------------------
# a worker lost mid-run
# ----------------------------------------------------------------------------------------------

# What TF 2.21 reports when a peer of MultiWorkerMirroredStrategy dies (measured on 127.0.0.1):
# the coordination service misses its heartbeats ("The following tasks are unhealthy (stopped
# sending heartbeats): /job:worker/replica:0/task:1", after ~15 s) or the next collective finds
# the connection gone ("Collective ops is aborted by: recvmsg:Connection reset by peer").
_TASK = re.compile(r"/job:\w+/replica:\d+/task:\d+")
_ABORTED = re.compile(r"Collective ops is aborted by: (?:Error reported from \S+: )?([^\n]*)")


def lost_worker_message(error: BaseException) -> str | None:
    """One line for a collective aborted because another worker died; None for other errors.

    Args:
      error: what model.fit raised.

    Example:
      >>> import tensorflow as tf
      >>> lost_worker_message(tf.errors.UnavailableError(None, None, "Collective ops is aborted "
      ...     "by: recvmsg:Connection reset by peer"))  # doctest: +ELLIPSIS
      'lost contact with another worker (recvmsg:Connection reset by peer); rerun every worker...'
    """
    if not isinstance(error, (tf.errors.UnavailableError, tf.errors.AbortedError,
                              tf.errors.DeadlineExceededError, tf.errors.CancelledError)):
        return None
    text = getattr(error, "message", None) or str(error)
    aborted = _ABORTED.search(text)
    if aborted is None and "heartbeat" not in text:
        return None
    unhealthy = (sorted(set(_TASK.findall(text.split("unhealthy", 1)[1])))
                 if "unhealthy" in text else [])
    cause = (f"{', '.join(unhealthy)} stopped sending heartbeats" if unhealthy
             else aborted.group(1).strip() if aborted else "missed heartbeats")
    return (f"lost contact with another worker ({cause}); rerun every worker with the same "
            "command to resume from the last checkpoint in the shared workdir")
