"""The trainer: what `python -m msa_xla.train` runs.

main.py (flags -> TrainConfig -> run, exit codes via msa_xla.cli) -> loop.py (one seed: strategy,
input, model, step, checkpoint, fit, eval, results) using config.py, inputs.py, step.py (what XLA
compiles), callbacks.py, checkpointing.py, results.py. Nothing is imported here: importing
`msa_xla.trainer.config` must not define absl flags or import TensorFlow.
"""
