"""Shared helpers of the trainer tests: a tiny dataset, tiny-model flags, subprocess runs."""
import json
import os
import random
import socket
import subprocess
import sys
import time

import numpy as np

from msa_xla.data import synthetic, writer

SIZES = (64, 16, 24)  # train / valid / test clips
SEQ_LEN = 8
DIMS = (6, 5, 4)
TINY = ["--model_dim=16", "--num_heads=2", "--ff_dim=32", "--n_layers_mod=1", "--n_layers_fuse=1",
        "--batch_size=8", "--verbose=0", "--learning_rate=3e-3"]


def make_tiny_dataset(folder, sizes=SIZES, tokenize=False):
    splits = synthetic.generate(sizes, seq_len=SEQ_LEN, dims=DIMS, seed=5)
    writer.convert(splits, folder, source_format="synthetic", source_path="-", tokenize=tokenize,
                   log=lambda line: None)
    return str(folder)


def without_xla_cache(env):
    """`env` without the session's XLA compilation cache (conftest.py). For a profiled run: it
    asks XLA for per-thunk trace events through XLA_FLAGS, which the cache's key does not
    include, so a cached executable compiled without them would be loaded silently."""
    flags = env.get("TF_XLA_FLAGS", "").split()
    kept = [f for f in flags if not f.startswith("--tf_xla_persistent_cache_directory")]
    return {**env, "TF_XLA_FLAGS": " ".join(kept)}


def run_train(args, *, timeout=240, env=None, wait=True):
    """`python -m msa_xla.train ARGS` in a fresh process (its own TF and devices)."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    command = [sys.executable, "-m", "msa_xla.train", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=full_env)
    if not wait:
        return process
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def _ports_below_the_ephemeral_range():
    """(low, high) ports that the kernel never hands out by itself, or None."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            first_ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return (10000, first_ephemeral) if first_ephemeral > 11000 else None


def free_ports(count):
    """`count` distinct ports, free now, for a cluster of worker processes on 127.0.0.1.

    The workers bind them seconds later, after importing TensorFlow. A port from bind(0) is in
    the ephemeral range, where any process's outgoing connection (another worker's gRPC channel,
    a parallel test) may take it in between; so the ports are drawn at random (the OS's
    randomness: the tests seed `random`) from below that range, which only an explicit bind to
    the same number can take. All are held while drawing, so they are distinct."""
    span = _ports_below_the_ephemeral_range()
    draw = random.SystemRandom()
    held = []
    try:
        for _ in range(1000):
            if len(held) == count:
                break
            s = socket.socket()
            try:
                s.bind(("0.0.0.0", draw.randrange(*span) if span else 0))
            except OSError:  # in use: draw again
                s.close()
                continue
            held.append(s)
        assert len(held) == count, "no free ports"
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def main_in_process(argv, capsys=None):
    """`python -m msa_xla.train ARGV` in this process, as entry_point runs it (the same flag
    parser, then main): (exit code, stdout, stderr). The flags are reset afterwards. Without
    capsys (a module fixture has none) the output is not captured and comes back as ""."""
    from msa_xla.cli import absl_flags_parser
    from msa_xla.trainer.main import FLAGS, main

    try:
        code = main(absl_flags_parser(FLAGS)(["msa_xla.train", *argv]))
    except SystemExit as stop:  # a flag absl itself rejects
        code = stop.code
    finally:
        FLAGS.unparse_flags()
    if capsys is None:
        return code, "", ""
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def model_weights(path):
    """Flat list of the weights of a saved .keras model."""
    import tf_keras as keras

    import msa_xla.models  # noqa: F401  (registers the classes)

    return [np.asarray(w) for w in keras.models.load_model(path).get_weights()]


def served(savedmodel_dir, inputs):
    """Predictions of the trainer's serving SavedModel (models/serving.py), loaded without
    msa_xla's classes, for inputs in the model's order."""
    import tensorflow as tf

    from msa_xla.models.serving import INPUT_NAMES

    serve = tf.saved_model.load(str(savedmodel_dir)).signatures["serving_default"]
    return serve(**dict(zip(INPUT_NAMES, inputs)))["sentiment"]


def results(workdir):
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)


def start_workers(args, ports):
    """`python -m msa_xla.train ARGS` once per port: a multi-worker cluster on 127.0.0.1."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    return [run_train(args, wait=False, env={"TF_CONFIG": json.dumps(
        {"cluster": cluster, "task": {"type": "worker", "index": i}})}) for i in range(len(ports))]


# What a worker prints when its gRPC server cannot bind its port (measured on TF 2.21: it exits 1
# about 20 s after the start, when TensorFlow initialises; the other workers wait for it).
BIND_FAILED = ("Could not start gRPC server", "Failed to add port to server")


def output_of(process, timeout=240):
    """(stdout, stderr) of a process, read once (to its end) and kept on it for later calls."""
    if not hasattr(process, "output"):
        process.output = process.communicate(timeout=timeout)
    return process.output


def _kill_all(processes):
    for process in processes:
        if process.poll() is None:
            process.kill()
        output_of(process)


def start_cluster(args, count, ready, *, ports=None, timeout=240, attempts=3):
    """Starts a `count`-worker cluster and waits until `ready(processes)` holds or a worker fails;
    returns (processes, ports). The first attempt uses `ports` if given.

    free_ports releases its ports before the workers bind them (seconds later, once TensorFlow
    starts): if another process takes one in between, that worker ends with BIND_FAILED and its
    peers wait for it forever. The whole cluster is then killed and started again on new ports.
    Any other failure returns at once, for the caller's assertions to report (output_of)."""
    for _ in range(attempts):
        ports = list(ports or free_ports(count))
        processes = start_workers(args, ports)
        deadline = time.time() + timeout
        try:
            while not ready(processes):
                if any(p.poll() not in (None, 0) for p in processes):
                    break
                assert time.time() < deadline, "the cluster never became ready"
                time.sleep(0.05)
            else:
                return processes, ports
        except BaseException:
            _kill_all(processes)
            raise
        failed = [p for p in processes if p.poll() not in (None, 0)]
        if not any(line in output_of(p)[1] for p in failed for line in BIND_FAILED):
            return processes, ports
        _kill_all(processes)
        ports = None  # taken by someone else: draw new ones
    raise AssertionError(f"no cluster could bind its ports in {attempts} attempts")


def all_ended(processes):
    return all(process.poll() is not None for process in processes)


def finish_all(processes, timeout=240):
    """[(stdout, stderr)] of every process; any still running at the end is killed."""
    try:
        return [output_of(process, timeout) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                output_of(process)
