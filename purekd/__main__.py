"""Command line: ``purekd demo [--epochs N] [--labels N] [--output-dir DIR]``."""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="purekd", description="purekd command line")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="distil a digits classifier into a small student that sees few labels")
    demo.add_argument("--epochs", type=int, default=40, help="student epochs (default 40)")
    demo.add_argument("--teacher-epochs", type=int, default=20, help="teacher epochs (default 20)")
    demo.add_argument("--labels", type=int, default=50,
                      help="labelled training images the students see (default 50)")
    demo.add_argument("--output-dir", default="purekd-demo", help="where results go")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--compile", action="store_true",
                      help="compile the loss path with torch.compile")
    args = parser.parse_args(argv)

    if args.command == "demo":
        try:
            from purekd.demo import run
        except ImportError as error:
            print(f"purekd demo needs the demo extra (pip install 'purekd[demo]'): {error}",
                  file=sys.stderr)
            return 2
        for name in ("epochs", "teacher_epochs", "labels"):
            if getattr(args, name) < 1:
                parser.error(f"--{name.replace('_', '-')} must be >= 1")
        start = time.perf_counter()
        run(args.output_dir, num_labels=args.labels, teacher_epochs=args.teacher_epochs,
            student_epochs=args.epochs, seed=args.seed, compile=args.compile)
        print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
