"""Where and how a run executes: strategies (distribute.py), precision policies (precision.py),
filesystems (storage.py: local, gs://, ram://), the CPU memory allocator (allocator.py) and every
private TF/Keras hook (compat.py).

Nothing is imported here, so `storage` can be loaded without TensorFlow (profiling/report.py).
"""
