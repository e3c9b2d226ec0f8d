"""The demo's task: a few prompts, completions of T words from a vocabulary of V, a known reward.

Each prompt's outcome space is all V^T completions (8³ = 512 by default), small enough to score
every completion through the model, so π_ref, π_θ and π* = π_ref·exp(r/β)/Z are known exactly.

Completions are written as text (``" red gold teal"``) and tokenised by a word-level tokenizer,
one token per word, EOS after the last word — so the preference file is an ordinary one that
``dpokit train`` reads, and the model's log-probability of a completion is that of its T word
tokens and the EOS.

The reference distribution that SFT learns from (documented, seeded): for prompt x the words are
drawn independently per position, word w at position t with probability ∝ exp(θ_{x,t,w}),
θ ~ N(0, ``ref_spread``²). π_ref is the SFT-trained transformer, measured exactly — not this table.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dpokit.errors import DpokitError

WORDS = ("red", "green", "blue", "cyan", "pink", "gold", "gray", "teal")
PROMPTS = ("paint the fence", "choose a palette", "name three colours", "mix the paint")

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
"""The word tokenizer's special tokens (:func:`build_word_tokenizer`), which no word may be."""

MAX_OUTCOMES = 2**20
"""Most completions per prompt (V^T): each is scored through the model at every probe."""

RewardFn = Callable[[int, Tensor], Tensor]
"""``reward(prompt_index, words) -> (N,)``: ``words`` is an ``(N, T)`` int64 tensor of word
indices (0..V−1) of N completions of that prompt."""


def token_score_reward(prompt_index: int, words: Tensor, *,
                       vocab_size: int = len(WORDS)) -> Tensor:
    """Σ_t s(y_t): each word has a fixed score, evenly spaced from −1.5 (the first word,
    ``red``) to +1.5 (the last, ``teal``) over the task's V = ``vocab_size`` words. Additive over
    positions; the same for every prompt."""
    scores = torch.linspace(-1.5, 1.5, vocab_size, dtype=torch.float64)
    return scores[words].sum(dim=-1)


def match_reward(prompt_index: int, words: Tensor, *, vocab_size: int = len(WORDS)) -> Tensor:
    """2 × the number of positions where y matches the prompt's target (word (i+t)·3 mod V at
    position t for prompt i, V = ``vocab_size``)."""
    length = words.shape[-1]
    target = torch.tensor([((prompt_index + t) * 3) % vocab_size for t in range(length)])
    return 2.0 * (words == target).double().sum(dim=-1)


def sorted_reward(prompt_index: int, words: Tensor, *, vocab_size: int = len(WORDS)) -> Tensor:
    """1.5 × the number of adjacent word pairs in strictly increasing vocabulary order
    (not additive over positions)."""
    return 1.5 * (words[..., 1:] > words[..., :-1]).double().sum(dim=-1)


REWARDS: dict[str, RewardFn] = {
    "token_score": token_score_reward,
    "match": match_reward,
    "sorted": sorted_reward,
}


@dataclass(frozen=True)
class DemoTask:
    """Prompts, vocabulary, completion length, reward and the reference distribution's seed."""

    prompts: tuple[str, ...] = PROMPTS
    words: tuple[str, ...] = WORDS
    length: int = 3
    reward: str | RewardFn = "token_score"
    ref_spread: float = 1.0
    seed: int = 0
    _reward_fn: RewardFn = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if callable(self.reward):
            fn = self.reward
        elif self.reward in REWARDS:
            # Over this task's words: a table sized for the default 8 would index past its end
            # (IndexError) with more words, and with fewer would not span −1.5..1.5.
            fn = functools.partial(REWARDS[self.reward], vocab_size=len(self.words))
        else:
            raise DpokitError(f"unknown reward {self.reward!r}; built-ins: "
                              f"{', '.join(REWARDS)} (or pass a Python callable)")
        object.__setattr__(self, "_reward_fn", fn)
        if self.length < 1 or len(self.words) < 2:
            raise DpokitError("the demo needs length ≥ 1 and at least 2 words")
        # One token per word (the space scores each completion as length word tokens + EOS): a
        # repeated word would count one sequence twice, and a word with whitespace or a special
        # token's name would not be the single word token the space assumes.
        if len(set(self.words)) != len(self.words):
            raise DpokitError(f"the demo's words must be distinct, got {list(self.words)}")
        for word in self.words:
            if not word or word != word.strip() or len(word.split()) != 1 or word in SPECIAL_TOKENS:
                raise DpokitError(f"the demo's word {word!r} must be one non-empty token without "
                                  f"whitespace, not one of {', '.join(SPECIAL_TOKENS)}")
        if not self.prompts:
            raise DpokitError("the demo needs at least one prompt")
        if self.num_outcomes > MAX_OUTCOMES:
            raise DpokitError(f"the demo's space has V^T = {len(self.words)}^{self.length} = "
                              f"{self.num_outcomes:,} completions per prompt, over the limit of "
                              f"{MAX_OUTCOMES:,} that every measurement scores through the model")

    @property
    def reward_name(self) -> str:
        return self.reward if isinstance(self.reward, str) else getattr(
            self.reward, "__name__", "custom")

    @property
    def num_outcomes(self) -> int:
        """V^T completions per prompt."""
        return len(self.words) ** self.length

    def all_completions(self) -> Tensor:
        """``(V^T, T)`` word indices of every completion, in lexicographic order."""
        from dpokit.theory import iter_sequences

        return torch.cat(list(iter_sequences(len(self.words), self.length,
                                             batch_size=self.num_outcomes)))

    def rewards(self, prompt_index: int, words: Tensor) -> Tensor:
        """r(x, y) of completions ``words`` ``(N, T)`` of prompt ``prompt_index``: ``(N,)``."""
        values = torch.as_tensor(self._reward_fn(prompt_index, words), dtype=torch.float64)
        if values.shape != (len(words),) or not torch.isfinite(values).all():
            raise DpokitError(f"the reward must return {len(words)} finite values, got shape "
                              f"{tuple(values.shape)}")
        return values

    def text(self, words: Tensor) -> list[str]:
        """Completion texts (leading space, words separated by spaces) of ``(N, T)`` indices."""
        return [" " + " ".join(self.words[i] for i in row) for row in words.tolist()]

    def reference_logits(self) -> Tensor:
        """θ ``(prompts, T, V)`` of the documented reference distribution (seeded)."""
        generator = torch.Generator().manual_seed(self.seed)
        return self.ref_spread * torch.randn(len(self.prompts), self.length, len(self.words),
                                             generator=generator, dtype=torch.float64)

    def sample_reference(self, prompt_index: int, n: int, generator: torch.Generator) -> Tensor:
        """``(n, T)`` word indices drawn from the reference distribution of one prompt."""
        probs = self.reference_logits()[prompt_index].softmax(dim=-1)  # (T, V)
        return torch.stack([torch.multinomial(probs[t], n, replacement=True, generator=generator)
                            for t in range(self.length)], dim=1)


def build_word_tokenizer(task: DemoTask):
    """A word-level ``PreTrainedTokenizerFast``: one token per prompt/completion word, plus
    ``<pad>``, ``<s>`` (prepended) and ``</s>`` (EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in [*task.words, *(w for p in task.prompts for w in p.split())]:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
