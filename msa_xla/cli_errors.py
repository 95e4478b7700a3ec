"""How the command-line entry points report a user's mistake: one `error:` line, exit code 2."""

import sys

USAGE_ERROR = 2


def report_error(error) -> int:
    """Prints the first line of `error` as `error: ...` on stderr; returns exit code 2."""
    text = str(error).strip().splitlines()
    print(f"error: {text[0] if text else type(error).__name__}", file=sys.stderr)
    return USAGE_ERROR


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
