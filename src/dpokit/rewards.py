"""Rewards named by the user: ``module:function``, ``path/to/file.py:function``, or a local
reward-model directory.

The function has TRL's reward-function signature, ``f(prompts, completions, **kwargs) ->
list[float]`` (text in; conversational prompts as message lists), so a TRL user's rewards carry
over. Like TRL, dpokit also passes ``completion_ids`` (each completion's token ids, its EOS
included when it ended) to a function that takes ``**kwargs`` or names that parameter — text
decoded without special tokens cannot tell a completion cut at ``max_new_tokens`` from one that
ended.

A directory is an ``AutoModelForSequenceClassification`` with one output (TRL's reward models
are) and its tokenizer: :class:`RewardModel` scores prompt + completion in batches, without
gradients. A text prompt is joined to its completion as is; a conversational one goes through the
reward tokenizer's chat template with the completion as the assistant's message (as TRL does).
Only the module or file the user names is imported. A reward that raises, returns the
wrong number of values or a non-finite one is a one-line error naming the reward and the step.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dpokit.errors import DpokitError
from dpokit.hub import parse_name

RewardFn = Callable[..., Sequence[float]]


class RewardModel:
    """A reward-model directory as a reward function: ``model(prompts, completions)``."""

    def __init__(self, path: str | Path, *, batch_size: int = 32, trust_remote_code: bool = False):
        from dpokit.models import load_reward_model, load_tokenizer

        self.path = str(path)
        self.batch_size = batch_size
        self.model = load_reward_model(path, trust_remote_code=trust_remote_code)
        self.tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        if self.model.config.pad_token_id is None:  # it finds each row's last token by padding
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.__name__ = f"reward model {self.path}"

    def to(self, device: Any) -> RewardModel:
        """Move the model (the trainer puts it on the policy's device)."""
        self.model.to(device)
        return self

    def text(self, prompt: Any, completion: str) -> str:
        """The scored text: prompt + completion, or the chat template over the conversation."""
        if isinstance(prompt, list):
            messages = [*prompt, {"role": "assistant", "content": completion}]
            if getattr(self.tokenizer, "chat_template", None):
                return self.tokenizer.apply_chat_template(messages, tokenize=False)
            return "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        return prompt + completion

    def __call__(self, prompts: Sequence[Any], completions: Sequence[str],
                 **kwargs: Any) -> list[float]:
        """One scalar per completion: the model's output at the row's last token."""
        import torch

        texts = [self.text(p, c) for p, c in zip(prompts, completions, strict=True)]
        # a chat template renders its own special tokens (a BOS): not a second time
        templated = (any(isinstance(p, list) for p in prompts)
                     and bool(getattr(self.tokenizer, "chat_template", None)))
        device = next(self.model.parameters()).device
        scores: list[float] = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                encoded = self.tokenizer(texts[start:start + self.batch_size], padding=True,
                                         add_special_tokens=not templated,
                                         return_tensors="pt").to(device)
                logits = self.model(**encoded).logits
                scores += logits[:, 0].float().cpu().tolist()
        return scores


def load_reward(spec: str) -> RewardFn:
    """The callable ``spec`` names (``pkg.module:fn`` or ``file.py:fn``), or a
    :class:`RewardModel` for a directory or a hub name (``Org/Name[@revision]``, from the
    Hugging Face cache: one without a ``:`` is never a function)."""
    if Path(spec).is_dir() or parse_name(spec) is not None:
        return RewardModel(spec)
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise DpokitError(f"reward {spec!r}: expected module:function, path/file.py:function "
                          f"or a reward-model directory")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise DpokitError(f"reward {spec!r}: file not found: {path}")
        module_spec = importlib.util.spec_from_file_location(f"dpokit_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as error:
            raise DpokitError(f"reward {spec!r}: importing {path} failed "
                              f"({type(error).__name__}: {error})") from None
    else:
        try:
            module = importlib.import_module(target)
        except Exception as error:
            raise DpokitError(f"reward {spec!r}: cannot import {target} "
                              f"({type(error).__name__}: {error})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise DpokitError(f"reward {spec!r}: {target} has no function {name!r}")
    return fn


def _takes(fn: RewardFn, name: str) -> bool:
    """Whether ``fn`` accepts the keyword ``name`` (by name or through ``**kwargs``)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: pass only the basics
        return False
    return any(p.kind is p.VAR_KEYWORD or (p.name == name and p.kind is not p.POSITIONAL_ONLY)
               for p in parameters)


def score(fn: RewardFn, spec: str, prompts: Sequence[Any], completions: Sequence[str], *,
          step: int, completion_ids: Sequence[Sequence[int]] | None = None) -> list[float]:
    """``fn(prompts=…, completions=…[, completion_ids=…])`` checked: one finite number per
    completion. ``step`` (1-based; 0: not in training) goes into the error messages."""
    where = f" at step {step}" if step else ""
    extra = ({"completion_ids": [list(ids) for ids in completion_ids]}
             if completion_ids is not None and _takes(fn, "completion_ids") else {})
    try:
        values = list(fn(prompts=list(prompts), completions=list(completions), **extra))
    except Exception as error:
        raise DpokitError(f"reward {spec} failed{where}: "
                          f"{type(error).__name__}: {error}") from None
    if len(values) != len(completions):
        raise DpokitError(f"reward {spec} returned {len(values)} values for "
                          f"{len(completions)} completions{where}")
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise DpokitError(f"reward {spec} returned a non-number{where}") from None
    bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
    if bad is not None:
        raise DpokitError(f"reward {spec} returned a non-finite value ({values[bad]}) for "
                          f"completion {bad}{where}")
    return values


def score_groups(fn: RewardFn, spec: str, prompts: Sequence[Any], groups: Sequence[Sequence[Any]],
                 *, step: int, device: Any = None) -> list[float]:
    """:func:`score` of generated completions: ``groups[i]`` are the completions (with ``text``
    and ``ids``) of ``prompts[i]``; one reward per completion, flattened in that order. A
    :class:`RewardModel` is first moved to ``device`` when one is given."""
    if device is not None and isinstance(fn, RewardModel):
        fn.to(device)
    flat = [c for group in groups for c in group]
    return score(fn, spec, [p for p, group in zip(prompts, groups, strict=True) for _ in group],
                 [c.text for c in flat], step=step, completion_ids=[c.ids for c in flat])
