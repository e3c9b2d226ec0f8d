"""Shared test settings (deterministic seeds, hypothesis profiles) and the fixtures several
modules use: the tokenizer and ``workdir`` (saved tiny models and preference/SFT files)."""

import os

import torch
from hypothesis import settings

settings.register_profile("default", max_examples=60, deadline=None, derandomize=True)
settings.register_profile("thorough", max_examples=600, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

torch.set_num_threads(1)


import json  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402

from tests.helpers import PROMPTS  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level BPE tokenizer trained in the test session (BOS, EOS, PAD, chat template)."""
    from dpokit.fixtures import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def workdir(tmp_path_factory, tokenizer):
    """A saved tiny Llama (and GPT-2, which has dropout) and a learnable preference set."""
    from dpokit.fixtures import tiny_causal_lm

    root = tmp_path_factory.mktemp("train")
    for kind in ("llama", "gpt2", "qwen2"):
        model = tiny_causal_lm(kind, vocab_size=len(tokenizer), seed=7)
        model.save_pretrained(root / kind)
        tokenizer.save_pretrained(root / kind)
    rng = random.Random(0)
    rows = [{"prompt": rng.choice(PROMPTS), "chosen": " yes good answer",
             "rejected": " no bad " + rng.choice(["red", "sea", "moon"])} for _ in range(48)]
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "sft.jsonl").write_text("".join(
        json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n" for r in rows))
    return root
