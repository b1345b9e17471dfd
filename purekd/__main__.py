"""Command line: ``purekd demo [--epochs N] [--labels N] [--output-dir DIR]`` and
``purekd cache-teacher [MODEL_DIR | --gguf FILE] --data FILE --k K --out DIR``."""

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
    cache = commands.add_parser(
        "cache-teacher",
        help="cache a Hugging Face causal LM's top-k next-token log-probabilities on disk")
    cache.add_argument("model", nargs="?", help="model directory (config.json + weights)")
    cache.add_argument("--gguf", help="a GGUF model file instead of a model directory")
    cache.add_argument("--data", required=True,
                       help="a text file (one sample a line) or JSON lines ('text' or "
                            "'input_ids' a line, optional integer 'id')")
    cache.add_argument("--out", required=True, help="the cache folder (resumed if partial)")
    cache.add_argument("--k", type=int, default=16, help="entries kept per token (default 16)")
    cache.add_argument("--max-length", type=int, default=None, help="tokens kept per sample")
    cache.add_argument("--values", default="float16",
                       choices=["float32", "float16", "bfloat16", "q8"],
                       help="how log-probabilities are stored (default float16)")
    cache.add_argument("--text-key", default="text", help="the JSON field holding the text")
    cache.add_argument("--limit", type=int, default=None, help="only the first N samples")
    cache.add_argument("--batch-size", type=int, default=8)
    cache.add_argument("--shard-samples", type=int, default=1024, help="samples per shard")
    cache.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    cache.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    if args.command == "cache-teacher":
        if (args.model is None) == (args.gguf is None):
            parser.error("give either a model directory or --gguf FILE (not both)")
        for name in ("k", "batch_size", "shard_samples", "max_length", "limit"):
            value = getattr(args, name)
            if value is not None and value < 1:
                parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        from purekd.teacher_cache._huggingface import run_cache_teacher

        return run_cache_teacher(args)

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
