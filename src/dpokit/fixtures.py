"""Tiny tokenizers and causal LMs built from nothing (no hub), for tests, demos and benchmarks.

    tokenizer = build_tokenizer()                      # byte-level BPE, BOS/EOS/PAD, chat template
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer))

Everything is seeded and offline: the tokenizer is trained with the ``tokenizers`` library on a
synthetic corpus, the model is randomly initialised from a ``transformers`` config.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""A minimal chat template in the style of Zephyr: ``<|role|>\\ncontent</s>\\n`` per turn."""

WORDS = ("the cat dog bird sat ran flew on under over a mat tree roof is was blue green red "
         "sky sea sun moon what where why how color answer question yes no good bad quick "
         "brown fox jumps lazy reward function model policy prefers").split()


def synthetic_corpus(num_lines: int = 400, *, seed: int = 0) -> list[str]:
    """Short English-like lines over a small vocabulary, reproducible from ``seed``."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice(".?!")
            for _ in range(num_lines)]


def build_tokenizer(corpus: Iterable[str] | None = None, *, vocab_size: int = 512,
                    chat_template: bool = True, add_bos: bool = True):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ``<s>``, ``</s>`` and ``<pad>``.

    Like Llama's, it prepends BOS to every encoding (``add_bos``); with ``chat_template`` it
    carries :data:`CHAT_TEMPLATE`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(list(corpus) if corpus is not None else synthetic_corpus(),
                                  trainer)
    if add_bos:
        bos = tokenizer.token_to_id("<s>")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


MODEL_KINDS = ("llama", "qwen2", "gpt2")


def tiny_config(kind: str = "llama", *, vocab_size: int = 512, hidden_size: int = 32,
                num_layers: int = 2, num_heads: int = 4, intermediate_size: int | None = None,
                max_positions: int = 1024, pad_token_id: int = 0, bos_token_id: int = 1,
                eos_token_id: int = 2):
    """A ``transformers`` config of a small decoder of the given family."""
    from transformers import AutoConfig

    special = {"pad_token_id": pad_token_id, "bos_token_id": bos_token_id,
               "eos_token_id": eos_token_id}
    if kind == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=vocab_size, n_embd=hidden_size,
                                    n_layer=num_layers, n_head=num_heads,
                                    n_positions=max_positions, **special)
    if kind in ("llama", "qwen2"):
        return AutoConfig.for_model(
            kind, vocab_size=vocab_size, hidden_size=hidden_size,
            intermediate_size=intermediate_size or 2 * hidden_size, num_hidden_layers=num_layers,
            num_attention_heads=num_heads, num_key_value_heads=max(1, num_heads // 2),
            max_position_embeddings=max_positions, tie_word_embeddings=False, **special)
    raise ValueError(f"unknown model kind {kind!r}; expected one of {MODEL_KINDS}")


def tiny_causal_lm(kind: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32,
                   **config_kwargs):
    """A randomly initialised causal LM from :func:`tiny_config`, seeded, in eval mode."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(kind, **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
