"""Entry point of `shuttlectl`: errors become one line on stderr and a published exit code."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from shuttled.const import ExitCode
from shuttled.errors import ProtocolError, ShuttledError


def _report(exc: ShuttledError, json_mode: bool) -> None:
    from shuttlectl.cli import PROG, print_json

    if json_mode:
        # One line, so that it also fits a `watch --json` stream of JSON lines.
        print_json({"error": {"code": exc.code, "message": str(exc)}}, compact=True)
    print(f"{PROG}: {exc}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    from shuttlectl.cli import build_parser, run

    args = list(sys.argv[1:] if argv is None else argv)
    json_mode = "--json" in args
    try:
        return run(build_parser().parse_args(args))
    except ShuttledError as exc:
        _report(exc, json_mode)
        return exc.exit_code
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        # A reply we could not render: say so in one line rather than a traceback.
        _report(
            ProtocolError(f"unexpected reply from the daemon ({type(exc).__name__}: {exc})"),
            json_mode,
        )
        return ExitCode.FAILED
    except BrokenPipeError:
        # `shuttlectl status | head`: the reader left; stay quiet about it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.OK
    except KeyboardInterrupt:
        return 128 + 2


if __name__ == "__main__":
    sys.exit(main())
