"""Every name a flag or an argument can take, defined once.

The trainer's flags (trainer/config.py `CHOICES`), the validators of the library (kernels, layers,
models, data, runtime) and the tools import their lists from here, so a new choice is added in
one place. No TensorFlow import: the flags are defined from these before TensorFlow loads.
"""

MODALITIES = ("text", "audio", "video")  # the model's input order
SPLITS = ("train", "valid", "test")
TEXT_INPUTS = ("features", "tokens")  # float features per step, or token ids through an embedding
MODEL_NAMES = ("seqlevel", "msa", "improved", "balanced", "mult")  # msa_xla.models.MODELS keys
ATTENTION_IMPLS = ("reference", "fused", "chunked")  # kernels/attention.py
POOLING_METHODS = ("mean", "attention")
STRATEGIES = ("auto", "cpu", "one_device", "mirrored", "multi_worker", "tpu")  # runtime/distribute.py
POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")  # keras mixed-precision policies
PRECISIONS = ("auto",) + POLICIES  # auto: bfloat16 on TPU, float16 on GPU, float32 on CPU
JIT_COMPILE = ("auto", "true", "false")
