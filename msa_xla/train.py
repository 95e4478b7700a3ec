"""`python -m msa_xla.train`: the trainer's command (flags and main are msa_xla/trainer/main.py)."""

from msa_xla.trainer.main import entry_point

if __name__ == "__main__":
    entry_point()
