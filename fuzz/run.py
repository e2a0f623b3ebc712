"""Run one fuzz target under atheris (libFuzzer) for a while: ``python -m fuzz.run TARGET [--seconds N]``.

Prints the number of executions and the rate when done; exits 0 when no crash was found. A crash makes
libFuzzer write ``crash-<sha1>`` (in ``--artifacts``, default the current directory) and exit non-zero.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

TARGET_NAMES = ("commands", "server", "data", "bdat", "reply", "address", "queue")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__.splitlines()[0])
    ap.add_argument("target", choices=TARGET_NAMES)
    ap.add_argument("--seconds", type=int, default=60, help="how long to fuzz (default 60)")
    ap.add_argument("--corpus", help="corpus directory: read at start, new inputs written to it")
    ap.add_argument("--artifacts", help="directory for crash files (default: the current directory)")
    ap.add_argument("--max-len", type=int, default=4096, help="longest input libFuzzer generates")
    ap.add_argument("--no-instrument", action="store_true", help="skip coverage instrumentation of mailhop")
    ap.add_argument("libfuzzer", nargs="*", help="extra libFuzzer flags, after --, e.g. -- -jobs=4")
    args = ap.parse_args(argv)

    try:
        import atheris
    except ImportError:
        print("atheris is not installed (pip install 'atheris>=2.3'; Python < 3.12)", file=sys.stderr)
        return 2

    if args.no_instrument:
        from .targets import TARGETS
    else:
        # Coverage feedback: mailhop (and the targets) are imported only now, instrumented as they load.
        with atheris.instrument_imports(include=["mailhop", "fuzz"]):
            from .targets import TARGETS
    target = TARGETS[args.target]
    count = 0
    start = time.monotonic()
    deadline = start + args.seconds

    def report() -> None:
        elapsed = max(time.monotonic() - start, 1e-9)
        print(f"fuzz.run {args.target}: {count} executions in {elapsed:.1f}s ({count / elapsed:.0f}/s)",
              flush=True)

    def one(data: bytes) -> None:
        nonlocal count
        count += 1
        target(data)
        # libFuzzer's own -max_total_time ends the process from C, with no chance to report: stop here.
        if not count & 255 and time.monotonic() >= deadline:
            report()
            sys.stderr.flush()
            os._exit(0)

    flags = [sys.argv[0], f"-max_total_time={args.seconds + 30}",  # a backstop: one() stops on time
             f"-dict={os.path.join(os.path.dirname(__file__), 'smtp.dict')}", f"-max_len={args.max_len}",
             "-print_final_stats=1", *args.libfuzzer]
    if args.artifacts:
        os.makedirs(args.artifacts, exist_ok=True)
        flags.append(f"-artifact_prefix={os.path.join(args.artifacts, '')}")
    if args.corpus:
        os.makedirs(args.corpus, exist_ok=True)
        flags.append(args.corpus)

    atheris.Setup(flags, one)
    atheris.Fuzz()
    return 0  # not reached: Fuzz() exits the process


if __name__ == "__main__":
    sys.exit(main())
