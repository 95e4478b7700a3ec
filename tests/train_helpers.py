"""Shared helpers of the trainer tests: a tiny dataset, tiny-model flags, subprocess runs."""
import json
import os
import random
import socket
import subprocess
import sys

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


def model_weights(path):
    """Flat list of the weights of a saved .keras model."""
    import tf_keras as keras

    import msa_xla.models  # noqa: F401  (registers the classes)

    return [np.asarray(w) for w in keras.models.load_model(path).get_weights()]


def results(workdir):
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)


def start_workers(args, ports):
    """`python -m msa_xla.train ARGS` once per port: a multi-worker cluster on 127.0.0.1."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    return [run_train(args, wait=False, env={"TF_CONFIG": json.dumps(
        {"cluster": cluster, "task": {"type": "worker", "index": i}})}) for i in range(len(ports))]


def finish_all(processes, timeout=240):
    """[(stdout, stderr)] of every process; any still running at the end is killed."""
    try:
        return [process.communicate(timeout=timeout) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
