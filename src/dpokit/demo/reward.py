"""The demo task's reward as a reward function of the trainer, on generated text.

On-policy DPO (``dpokit train --online --reward SPEC``) scores what the policy generates, which
may be anything the model can emit. :class:`TaskReward` gives every completion a reward, the same
the exact measurements use (docs/theory.md §6):

    r(x, y) = the task's reward of y's words     if y is ``length`` colour words, then EOS
    r(x, y) = r_invalid                          otherwise (another length, another token,
                                                 or no EOS within max_new_tokens)

It has TRL's reward-function signature, ``f(prompts, completions, completion_ids, **kwargs)``.
The demo writes its settings to ``task.json`` and a two-line ``reward.py`` beside it, so the run
it trains is an ordinary ``dpokit train --online --reward out/demo/reward.py:reward`` run:

    from dpokit.demo.reward import TaskReward
    reward = TaskReward.from_json(__file__, "task.json")
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dpokit.demo.task import DemoTask
from dpokit.errors import DpokitError


class TaskReward:
    """``reward(prompts, completions, completion_ids) -> list[float]`` of a :class:`DemoTask`."""

    def __init__(self, task: DemoTask, *, eos_token_id: int, r_invalid: float):
        self.task = task
        self.eos_token_id = eos_token_id
        self.r_invalid = float(r_invalid)
        self._word_index = {word: i for i, word in enumerate(task.words)}

    def settings(self) -> dict[str, Any]:
        """What :meth:`from_json` reads back: a built-in reward by name, a custom one as the
        ``module:name`` it imports from (a module-level function; a lambda or a local function
        cannot be found again and is refused)."""
        reward = self.task.reward
        return {"prompts": list(self.task.prompts), "words": list(self.task.words),
                "length": self.task.length,
                "reward": reward if isinstance(reward, str) else callable_spec(reward),
                "eos_token_id": self.eos_token_id, "r_invalid": self.r_invalid}

    @classmethod
    def from_json(cls, anchor: str | Path, name: str = "task.json") -> TaskReward:
        """The reward whose settings are in ``name`` beside the file ``anchor``."""
        path = Path(anchor).resolve().parent / name
        try:
            data = json.loads(path.read_text())
            reward = data["reward"]
            if isinstance(reward, str) and ":" in reward:  # a custom reward, module:name
                reward = resolve_callable(reward)
            task = DemoTask(prompts=tuple(data["prompts"]), words=tuple(data["words"]),
                            length=int(data["length"]), reward=reward)
            return cls(task, eos_token_id=int(data["eos_token_id"]),
                       r_invalid=float(data["r_invalid"]))
        except (OSError, ValueError, KeyError, TypeError, ImportError,
                AttributeError) as error:
            raise DpokitError(f"{path}: not a demo task file ({type(error).__name__}: "
                              f"{error})") from None

    def words(self, completion: str, ids: Sequence[int] | None) -> list[int] | None:
        """Word indices of an in-space completion, or None (outside the space)."""
        if ids is not None and (len(ids) != self.task.length + 1
                                or ids[-1] != self.eos_token_id):
            return None
        tokens = completion.split()
        if len(tokens) != self.task.length or any(t not in self._word_index for t in tokens):
            return None
        return [self._word_index[t] for t in tokens]

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 completion_ids: Sequence[Sequence[int]] | None = None,
                 **kwargs: Any) -> list[float]:
        """One reward per completion (see the module docstring); ``completion_ids`` (EOS
        included when the completion ended) tells a cut completion from a finished one."""
        ids = completion_ids if completion_ids is not None else [None] * len(completions)
        out = []
        for prompt, text, row in zip(prompts, completions, ids, strict=True):
            if prompt not in self.task.prompts:
                raise ValueError(f"prompt {prompt!r} is not one of the task's")
            words = self.words(text, row)
            out.append(self.r_invalid if words is None else float(self.task.rewards(
                self.task.prompts.index(prompt), torch.tensor([words]))[0]))
        return out


def resolve_callable(spec: str) -> Any:
    """The object ``module:qualified.name`` names (ImportError/AttributeError if none)."""
    module, _, qualname = spec.partition(":")
    target: Any = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def callable_spec(fn: Any) -> str:
    """``module:qualname`` of a module-level callable, checked to import back to ``fn``."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    spec = f"{module}:{qualname}"
    try:
        found = (module and qualname and "<" not in qualname) and resolve_callable(spec) is fn
    except (ImportError, AttributeError):
        found = False
    if not found:
        raise DpokitError(f"the custom reward {spec} cannot be written to task.json: on-policy "
                          f"training loads it by module:name, so it must be a module-level "
                          f"function (not a lambda or a local function)")
    return spec


def write_reward_file(out: Path, reward: TaskReward) -> str:
    """Write ``task.json`` and ``reward.py`` into ``out``; return the reward spec."""
    from dpokit.atomic import write_text

    write_text(out / "task.json", json.dumps(reward.settings(), indent=2))
    write_text(out / "reward.py", "from dpokit.demo.reward import TaskReward\n\n"
                                  "reward = TaskReward.from_json(__file__, \"task.json\")\n")
    return f"{out / 'reward.py'}:reward"
