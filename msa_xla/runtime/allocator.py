"""TensorFlow's CPU memory allocator: the trainer, the predictor and the benchmarks pool memory.

Why: TF's default CPU allocator takes every tensor from malloc. glibc serves large blocks with a
fresh mmap and unmaps them when they are freed, so every step page-faults its multi-megabyte
activations in again (a MulT step's B x H x Tq x Tk attention maps above all), and XLA:CPU's
kernels wait on the kernel's page clearing instead of computing. TF's BFC allocator (the one it
uses on GPUs) keeps freed blocks in a pool and hands them out again. The price: a process keeps
its peak, BFC never returns the pool to the OS. `TF_CPU_ALLOCATOR_USE_BFC=false` in the
environment keeps malloc. Measured with `tools/bench_peers.py` (README, "MulT against MMSA's
PyTorch MulT").

TF reads the variable once, when it creates its devices, so `prefer_pooled_cpu_allocator` must
run before the first op; `import tensorflow` alone does not create them.
"""

import os

VARIABLE = "TF_CPU_ALLOCATOR_USE_BFC"


def prefer_pooled_cpu_allocator():
    """Asks TF for its BFC allocator on CPU unless the environment already says which."""
    os.environ.setdefault(VARIABLE, "true")


def cpu_allocator() -> str:
    """'bfc' if the CPU device allocates from TF's BFC pool, else 'malloc' (creates the devices).

    Only a BFC allocator keeps the statistics `get_memory_info` reads.
    """
    import tensorflow as tf

    try:
        tf.config.experimental.get_memory_info("CPU:0")
    except ValueError:
        return "malloc"
    return "bfc"
