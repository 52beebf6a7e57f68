"""One refusal line for every command-line entry point.

Expected errors (bad input, a missing or unreadable file, a refused checkpoint) become one
line on stderr, `error: <what happened and where>: <how to fix it>`, and exit code 2; the
traceback is printed only with --verbose. Anything else is a bug and keeps its traceback.

    sys.exit(errors.run_cli(main, argv))        # argparse entry points (parser: errors.ArgumentParser)
    app.run(main, flags_parser=errors.parse_flags)  # absl entry points: flag errors ...
    with errors.refusals(verbose): ...           # ... and, inside main, everything else
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import traceback

from absl import flags


class UnsafeCheckpointError(ValueError):
    """A checkpoint that would run code if unpickled."""


class UnreadableCheckpointError(ValueError):
    """No step of a checkpoint directory can be restored (each is named with its fault)."""


# OSErrors are expected (a path that does not exist, a read-only directory, a full disk);
# ImportError names a missing optional extra.
EXPECTED = (ValueError, OSError, ImportError, KeyError, FloatingPointError)


def message(error: BaseException) -> str:
    """The one line for an expected error."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        hint = {1: "choose a directory you can write to, or fix its permissions",
                13: "choose a directory you can write to, or fix its permissions",
                30: "choose a directory on a writable file system",
                28: "free disk space or choose another output directory",
                17: "a file is in the way: choose another path", 20: "a file is in the way: check the path",
                2: "check the path"}.get(error.errno, "check the path and its permissions")
        return f"{error.strerror.lower()} ({error.filename}): {hint}"
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    text = text.replace("\\n", " ").replace("\\'", "'")  # a KeyError's repr inside another error
    misspelt = re.search(r"'(?P<key>[^' ]+)'.*?(?P<hint>Did you mean [^?]*\?)", text)
    if misspelt:  # ml_collections' unknown-field error, possibly wrapped
        return f"no config field {misspelt['key']!r}: {misspelt['hint']}"
    return " ".join(text.split())  # one line


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a bad argument refused in one line (`error: <prog>: <what>; see --help`),
    not the usage block; exit code 2 as before. Its sub-parsers are of this class too."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr, flush=True)
        raise SystemExit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (for `app.run(..., flags_parser=parse_flags)`), with a misspelt
    `--config.x=y` override or a bad flag value refused in one line (exit code 2)."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError) as error:
        if "--verbose" in argv:
            traceback.print_exc()
        print(f"error: bad command-line flag: {message(error)} (see --helpfull for the flags; config "
              "fields are listed in the config file)", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


@contextlib.contextmanager
def refusals(verbose: bool = False):
    """Turns expected errors inside the block into the refusal line and SystemExit(2)."""
    try:
        yield
    except EXPECTED as error:
        if verbose:
            traceback.print_exc()
        print(f"error: {message(error)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def run_cli(main, argv=None) -> int:
    """main(argv) → exit code, with expected errors refused in one line (`--verbose` anywhere
    in argv shows the traceback; main's own parser must accept the flag)."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        with refusals("--verbose" in args):
            return int(main(argv) or 0)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
