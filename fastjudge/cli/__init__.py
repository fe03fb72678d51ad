"""The `fastjudge` command: `iterate` (the whole loop), each stage on its own (`stages`), and the commands around
the loop (`tools`). Anticipated failures are one line on stderr; `--debug` shows the traceback."""

from __future__ import annotations

import argparse
import os
import sys

from fastjudge.cli import stages, tools


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastjudge", description=__doc__)
    parser.add_argument("--debug", action="store_true",
                        help="show the whole traceback of an error instead of its one-line message")
    sub = parser.add_subparsers(dest="command", required=True)
    stages.add_parsers(sub)
    tools.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; anticipated failures are one line on stderr (a traceback only with --debug): a bad input
    or setting (ValueError) or a file system error (a missing file, a full disk: OSError) exit 2, Ctrl-C 130, and
    a reader that closed the pipe (`fastjudge cost | head`) 141, as a shell reports SIGPIPE."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except BrokenPipeError:
        # whatever is still buffered for the closed pipe must not raise again when the interpreter flushes it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        _leave_process_group(finished=False)
        return 141
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"fastjudge {args.command}: interrupted (a run folder resumes with --resume)", file=sys.stderr)
        _leave_process_group(finished=False)
        return 130
    except (ValueError, OSError) as exc:
        if args.debug:
            raise
        print(f"fastjudge {args.command}: error: {exc}", file=sys.stderr)
        _leave_process_group(finished=False)
        return 2
    _leave_process_group(finished=True)
    return 0


def _leave_process_group(finished: bool) -> None:
    """Under torchrun, leave the process group before the interpreter exits: left to the exit's teardown, gloo's
    threads can abort a rank ("terminate called without an active exception"). A rank that finished waits for
    the others first (rank 0 may still be writing); one that failed leaves at once, and torchrun ends the job."""
    if "torch.distributed" not in sys.modules:  # no command imported it: no process group, torch stays unloaded
        return
    from fastjudge.core import dist
    if finished:
        dist.barrier()
    dist.stop()


if __name__ == "__main__":
    sys.exit(main())
