"""Tests for msa_xla.runtime.distribute: one-line errors, strategies on CPU, batch check, chief logic."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import tensorflow as tf

from msa_xla.runtime.distribute import (
    STRATEGIES,
    StrategyError,
    check_global_batch,
    device_platform,
    get_strategy,
    is_chief,
    lost_worker_message,
    worker_index,
    xla_can_compile_collectives,
)
from tests.train_helpers import free_ports


def _run_python(code, env_extra=None, timeout=120):
    """Runs `code` in a fresh interpreter (device set-up must precede TF's initialisation)."""
    env = {key: value for key, value in os.environ.items() if key != "TF_CONFIG"}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", **(env_extra or {}))
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- bad requests


def test_unknown_strategy_lists_choices():
    with pytest.raises(StrategyError, match="unknown strategy 'gpu'; choose one of auto, cpu"):
        get_strategy("gpu")


@pytest.mark.parametrize("name", ["cpu", "mirrored", "multi_worker", "one_device"])
def test_tpu_flag_with_non_tpu_strategy_is_rejected(name):
    message = f"--tpu=local cannot be combined with --strategy={name}"
    with pytest.raises(StrategyError, match=message):
        get_strategy(name, tpu="local")


@pytest.mark.parametrize("name", ["tpu", "auto"])
def test_no_tpu_is_a_one_line_strategy_error(name):
    # This machine has no TPU: TF raises NotFoundError("TPUs not found in the cluster ...")
    # from initialize_tpu_system; get_strategy turns it into one line.
    with pytest.raises(StrategyError) as caught:
        get_strategy(name, tpu="local")
    message = str(caught.value)
    assert "\n" not in message
    assert message == (
        "no TPU found for --tpu=local: this machine has no TPU "
        "(use --strategy=cpu or --strategy=mirrored)"
    )
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_tpu_strategy_defaults_to_local():
    with pytest.raises(StrategyError, match="--tpu=local"):
        get_strategy("tpu")


def test_multi_worker_needs_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(StrategyError, match="needs the TF_CONFIG environment variable"):
        get_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(StrategyError, match="TF_CONFIG is not valid JSON"):
        get_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {}}')
    with pytest.raises(StrategyError, match="'cluster' and 'task'"):
        get_strategy("multi_worker")


# ---------------------------------------------------------------------------- batch check


def test_check_global_batch():
    assert check_global_batch(32, 8) == 4
    assert check_global_batch(7, 1) == 7
    message = "^global batch size 30 is not divisible by the 4 replicas$"
    with pytest.raises(StrategyError, match=message):
        check_global_batch(30, 4)
    with pytest.raises(StrategyError, match="must be positive"):
        check_global_batch(0, 2)


# ---------------------------------------------------------------------------- strategies


def test_cpu_strategy_has_one_replica_and_compiles_whole_step():
    strategy = get_strategy("cpu")
    assert isinstance(strategy, tf.distribute.OneDeviceStrategy)
    assert strategy.num_replicas_in_sync == 1
    assert device_platform(strategy) == "CPU"
    assert xla_can_compile_collectives(strategy)
    assert device_platform(tf.distribute.get_strategy()) == "CPU"  # default strategy too
    assert get_strategy("AUTO").num_replicas_in_sync == 1  # no GPU, no TPU here


@pytest.mark.slow
def test_mirrored_over_two_logical_cpus():
    output = _run_python(
        """
        import json
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from msa_xla.runtime.distribute import (device_platform, get_strategy, is_chief,
                                        xla_can_compile_collectives)
        mirrored = get_strategy("mirrored")
        auto = get_strategy("auto")
        print(json.dumps({
            "type": type(mirrored).__name__,
            "replicas": mirrored.num_replicas_in_sync,
            "platform": device_platform(mirrored),
            "whole_step_jit": xla_can_compile_collectives(mirrored),
            "chief": is_chief(mirrored),
            "auto_replicas": auto.num_replicas_in_sync,
        }))
        """
    )
    assert output == {
        "type": "MirroredStrategy",
        "replicas": 2,
        "platform": "CPU",
        "whole_step_jit": False,  # XLA has no CPU collectives
        "chief": True,
        "auto_replicas": 1,  # auto mirrors GPUs only
    }


@pytest.mark.slow
def test_multi_worker_single_worker_from_tf_config():
    (port,) = free_ports(1)  # for the one-worker gRPC server
    tf_config = {
        "cluster": {"worker": [f"localhost:{port}"]},
        "task": {"type": "worker", "index": 0},
    }
    output = _run_python(
        """
        import json
        from msa_xla.runtime.distribute import get_strategy, is_chief, worker_index
        strategy = get_strategy("multi_worker")
        import tensorflow as tf
        multi = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        print(json.dumps({"type": "MultiWorkerMirroredStrategy" if multi else str(type(strategy)),
                          "replicas": strategy.num_replicas_in_sync,
                          "chief": is_chief(strategy), "index": worker_index(strategy)}))
        """,
        env_extra={"TF_CONFIG": json.dumps(tf_config)},
    )
    assert output == {
        "type": "MultiWorkerMirroredStrategy",
        "replicas": 1,
        "chief": True,
        "index": 0,
    }


# ---------------------------------------------------------------------------- chief logic

_WITH_CHIEF = {"chief": ["c:1"], "worker": ["a:1"]}
_WITH_EVALUATOR = {"worker": ["a:1"], "evaluator": ["e:1"]}


@pytest.mark.parametrize(
    "tf_config,chief,index",
    [
        (None, True, 0),
        ({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 0}}, True, 0),
        ({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}, False, 1),
        (
            {"cluster": _WITH_CHIEF, "task": {"type": "chief", "index": 0}},
            True,
            0,
        ),
        (
            {"cluster": _WITH_CHIEF, "task": {"type": "worker", "index": 0}},
            False,
            1,
        ),
        (
            {"cluster": _WITH_EVALUATOR, "task": {"type": "evaluator", "index": 0}},
            False,
            0,
        ),
    ],
)
def test_is_chief_and_worker_index_from_tf_config(monkeypatch, tf_config, chief, index):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", json.dumps(tf_config))
    assert is_chief() is chief
    assert worker_index() == index


def test_strategy_names_are_documented():
    assert STRATEGIES == ("auto", "cpu", "one_device", "mirrored", "multi_worker", "tpu")


@pytest.mark.parametrize("message, cause", [
    # What the survivor got when the other worker was SIGKILLed (TF 2.21, 127.0.0.1).
    ("Graph execution error:\n\nDetected at node mul_16/CollectiveReduceV2 ...\nCollective ops is "
     "aborted by: Error reported from /job:worker/task:1: The following tasks are unhealthy "
     "(stopped sending heartbeats):\n/job:worker/replica:0/task:1\nThe tasks have crashed.",
     "/job:worker/replica:0/task:1 stopped sending heartbeats"),
    ("Graph execution error:\n\nCollective ops is aborted by: recvmsg:Connection reset by peer\n"
     "Additional GRPC error information ...", "recvmsg:Connection reset by peer"),
])
def test_lost_worker_message_names_the_cause(message, cause):
    line = lost_worker_message(tf.errors.UnavailableError(None, None, message))
    assert line.startswith(f"lost contact with another worker ({cause}); rerun every worker")
    assert "\n" not in line


def test_other_errors_are_not_lost_workers():
    assert lost_worker_message(tf.errors.UnavailableError(None, None, "GCS unreachable")) is None
    assert lost_worker_message(tf.errors.InvalidArgumentError(
        None, None, "Collective ops is aborted by: x")) is None
    assert lost_worker_message(ValueError("Collective ops is aborted by: x")) is None
