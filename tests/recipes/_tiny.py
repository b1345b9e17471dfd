"""Tiny offline ingredients of a recipe run: a byte-level BPE tokenizer trained on a few lines
(with a chat template), a random-initialised 4-layer Llama saved as a model directory, and
data files of each format."""

from __future__ import annotations

import json
from pathlib import Path

import torch

LINES = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
    "And the Spirit of God moved upon the face of the waters.",
    "And God said, Let there be light: and there was light.",
    "And God saw the light, that it was good: and God divided the light from the darkness.",
    "And God called the light Day, and the darkness he called Night.",
    "And the evening and the morning were the first day.",
    "And God said, Let there be a firmament in the midst of the waters.",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<|pad|>", "<|bos|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(LINES * 4, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|pad|>",
                                  bos_token="<|bos|>", eos_token="<|end|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def llama(vocab: int, layers: int = 4, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def write_teacher(folder: Path) -> Path:
    tok = tokenizer()
    model = llama(len(tok))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_data(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"text": folder / "text.jsonl", "pc": folder / "pc.jsonl",
             "chat": folder / "chat.jsonl"}
    with open(paths["text"], "w") as f:
        for line in LINES * 6:
            f.write(json.dumps({"text": line}) + "\n")
    with open(paths["pc"], "w") as f:
        for i, line in enumerate(LINES * 2):
            f.write(json.dumps({"prompt": f"Verse {i}:", "completion": " " + line}) + "\n")
    with open(paths["chat"], "w") as f:
        for i, line in enumerate(LINES * 2):
            messages = [{"role": "user", "content": f"Say verse {i}."},
                        {"role": "assistant", "content": line}]
            if i % 2:
                messages.insert(0, {"role": "system", "content": "Be brief."})
            f.write(json.dumps({"messages": messages}) + "\n")
    return paths
