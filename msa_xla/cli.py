"""What the commands (`python -m msa_xla.train`, `python -m msa_xla.predict`, tools/) tell the shell.

Every exit code is defined here. A user's mistake raises `msa_xla.errors.UserError`; the commands
print its first line as `error: ...` on stderr and exit with `EXIT_USAGE`. Anything else is a bug
and keeps its traceback. No TensorFlow import here.
"""

import sys

EXIT_OK = 0
EXIT_USAGE = 2          # a user's mistake: a bad flag, setting, file or dataset (one `error:` line)
EXIT_DIVERGED = 3       # the loss became NaN or inf (the run stops; its checkpoints stay)
EXIT_LOST_WORKER = 4    # another worker of a multi-worker run died: rerun every worker to resume
EXIT_PREEMPTED = 143    # SIGTERM after a checkpoint (128 + 15, what schedulers expect): rerun


def report_error(error, code: int = EXIT_USAGE) -> int:
    """Prints the first line of `error` (an exception or a message) as `error: ...` on stderr;
    returns `code`."""
    text = str(error).strip().splitlines()
    first = text[0] if text else type(error).__name__
    print(f"error: {first}", file=sys.stderr)
    return code


def absl_flags_parser(flag_values):
    """An `app.run(flags_parser=...)` that turns a bad flag into one line and exit code 2
    (absl alone prints usage and exits 1)."""

    def parse(argv):
        try:
            return flag_values(argv)
        except Exception as error:  # absl.flags.Error and its subclasses
            from absl import flags

            if not isinstance(error, flags.Error):
                raise
            sys.exit(report_error(error))

    return parse
