"""Rewards named by the user: ``module:function``, ``path/to/file.py:function``, or a local
reward-model directory.

The function has TRL's reward-function signature, ``f(prompts, completions, **kwargs) ->
list[float]``, and gets what TRL passes: text, or for a conversational prompt (a message list)
the completion as one assistant message, ``[{"role": "assistant", "content": text}]`` — so a
TRL user's rewards carry over. Like TRL, dpokit also passes ``completion_ids`` (each
completion's token ids, its EOS included when it ended) to a function that takes ``**kwargs``
or names that parameter — text decoded without special tokens cannot tell a completion cut at
``max_new_tokens`` from one that ended.

A directory is an ``AutoModelForSequenceClassification`` with one output (TRL's reward models
are) and its tokenizer: :class:`RewardModel` scores prompt + completion in batches, without
gradients. A text prompt is joined to its completion as is; a conversational one goes through the
reward tokenizer's chat template with the completion as the assistant's message (as TRL does).
Only the module or file the user names is imported. A reward that raises, returns the
wrong number of values, a non-number (a string, None) or a non-finite one is a one-line error
naming the reward, the step and the completion; so is a text longer than a reward model's
positions.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from dpokit.errors import DpokitError
from dpokit.hub import parse_name

RewardFn = Callable[..., Sequence[float]]


class RewardModel:
    """A reward-model directory as a reward function: ``model(prompts, completions)``."""

    def __init__(self, path: str | Path, *, batch_size: int = 32, trust_remote_code: bool = False):
        from dpokit.models import load_reward_model, load_tokenizer, position_limit

        self.path = str(path)
        self.batch_size = batch_size
        self.model = load_reward_model(path, trust_remote_code=trust_remote_code)
        self.tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        if self.model.config.pad_token_id is None:  # it finds each row's last token by padding
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.positions = position_limit(path, what="reward model")
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
        """One scalar per completion: the model's output at the row's last token.

        Rows are padded on the right with the model's own ``pad_token_id`` (the id it finds each
        row's last token by), whatever the tokenizer's padding side and pad token, so a text
        scores the same in any batch as alone (left padding would shift an absolute-position
        model's positions). A text longer than the model's positions is a one-line error."""
        import torch

        where = kwargs.get("rows")
        rows = [self.encode(p, c, i, None if where is None else where[i]) for i, (p, c) in
                enumerate(zip(prompts, completions, strict=True))]
        pad = self.model.config.pad_token_id
        device = next(self.model.parameters()).device
        scores: list[float] = []
        with torch.no_grad():
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start:start + self.batch_size]
                width = max(len(r) for r in chunk)
                ids = torch.tensor([r + [pad] * (width - len(r)) for r in chunk], device=device)
                mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk],
                                    device=device)
                logits = self.model(input_ids=ids, attention_mask=mask).logits
                scores += logits[:, 0].float().cpu().tolist()
        return scores

    def encode(self, prompt: Any, completion: str, index: int = 0,
               row: str | None = None) -> list[int]:
        """The token ids of :meth:`text` — a chat template renders its own special tokens (a
        BOS), so they are not added a second time — checked against the model's positions
        (``row``: where completion ``index`` comes from, for the error)."""
        templated = isinstance(prompt, list) and bool(getattr(self.tokenizer, "chat_template",
                                                              None))
        ids = list(self.tokenizer(self.text(prompt, completion),
                                  add_special_tokens=not templated)["input_ids"])
        if self.positions is not None and len(ids) > self.positions[0]:
            positions, key = self.positions
            at = f" ({row})" if row is not None else ""
            raise DpokitError(f"completion {index}{at} with its prompt is {len(ids)} tokens, "
                              f"longer than the reward model has positions ({key} = "
                              f"{positions}); "
                              f"lower max_new_tokens or max_prompt_length")
        return ids


def load_reward(spec: str) -> RewardFn:
    """The callable ``spec`` names (``pkg.module:fn`` or ``file.py:fn``), or a
    :class:`RewardModel` for a directory or a hub name (``Org/Name[@revision]``, from the
    Hugging Face cache: one without a ``:`` is never a function). A file's directory goes first
    on ``sys.path``, and for a module the working directory, as ``python file.py`` and
    ``python -m`` would have them: the reward's own helper modules import."""
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
        # registered under a name of its own (one per file) while it runs, as a module is:
        # dataclasses, pickling and typing look the module up in sys.modules by name
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        module_name = f"dpokit_reward_{path.stem}_{digest}"
        _importable(path.resolve().parent)  # as ``python file.py``: its siblings import
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except BaseException as error:
            sys.modules.pop(module_name, None)
            if not isinstance(error, Exception | SystemExit):  # Ctrl-C stays Ctrl-C
                raise
            raise DpokitError(f"reward {spec!r}: importing {path} failed "
                              f"({_one_line(error)}){_relative_hint(error, target)}") from None
    else:
        # as ``python -m``, the working directory's modules import (the ``dpokit`` console
        # script's sys.path starts with its own bin directory instead)
        _importable(Path.cwd())
        try:
            module = importlib.import_module(target)
        except (Exception, SystemExit) as error:  # sys.exit() in it would end the run, exit 0
            raise DpokitError(f"reward {spec!r}: cannot import {target} "
                              f"({_one_line(error)})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise DpokitError(f"reward {spec!r}: {target} has no function {name!r}")
    return fn


def _relative_hint(error: BaseException, target: str) -> str:
    """A hint for a reward file that imports relatively (``from .helper import x``): run as a
    file it has no package, as under ``python file.py``; as a module it has one."""
    if isinstance(error, ImportError) and "relative import" in str(error):
        return (f"; a file with relative imports is a module of its package: name it as "
                f"package.module:function (from the package's parent directory), not {target}")
    return ""


def _importable(directory: Path) -> None:
    """Put ``directory`` first on ``sys.path`` (once), as Python does for a script's own
    directory: a reward file's helper modules beside it import as they would if it ran."""
    if not any(entry and Path(entry).resolve() == directory for entry in sys.path):
        sys.path.insert(0, str(directory))


def _takes(fn: RewardFn, name: str) -> bool:
    """Whether ``fn`` accepts the keyword ``name`` (by name or through ``**kwargs``)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: pass only the basics
        return False
    return any(p.kind is p.VAR_KEYWORD or (p.name == name and p.kind is not p.POSITIONAL_ONLY)
               for p in parameters)


def _one_line(error: BaseException) -> str:
    """``Type: message`` of an exception raised in the user's code, on one line, with the
    file and line of the user's code it was raised from when there is one."""
    message = " / ".join(line.strip() for line in str(error).splitlines() if line.strip())
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    libraries = tuple({sys.prefix, sys.base_prefix, sys.exec_prefix})
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if not f.filename.startswith(("<", *libraries))
              and Path(f.filename).resolve() != Path(__file__).resolve()]
    if frames:
        text += f" ({Path(frames[-1].filename).name}, line {frames[-1].lineno})"
    return text


def _number(value: Any) -> float | None:
    """``value`` as a float when it is one number (a Python or NumPy number, or a tensor or
    array of one element), else None — a string, None, a list, a tensor of several."""
    if isinstance(value, bool | numbers.Real):
        try:
            return float(value)
        except OverflowError:  # an int past float's range: reported as non-finite
            return math.inf if value > 0 else -math.inf
        except (TypeError, ValueError):
            return None
    shape = getattr(value, "shape", None)
    if shape is not None and getattr(value, "dtype", None) is not None:
        size = math.prod(shape)
        kind = str(value.dtype)
        if size == 1 and not kind.startswith(("complex", "torch.complex", "<U", "|S", "object")):
            try:
                return float(value.reshape(()).item() if hasattr(value, "item") else value)
            except OverflowError:
                return math.inf
            except Exception:  # a meta tensor, a broken array type: not a number
                return None
    return None


_RESERVED = frozenset({"prompts", "completions", "completion_ids", "rows", "trainer_state"})
"""Keywords a reward function gets from dpokit itself: a data column of one of these names is
not passed."""


def score(fn: RewardFn, spec: str, prompts: Sequence[Any], completions: Sequence[str], *,
          step: int, completion_ids: Sequence[Sequence[int]] | None = None,
          rows: Sequence[str] | None = None,
          columns: Mapping[str, Sequence[Any]] | None = None,
          global_step: int = 0) -> list[float]:
    """``fn(prompts=…, completions=…[, completion_ids=…][, COLUMN=…][, trainer_state=…])``
    checked: one finite number per completion. ``step`` (1-based; 0: not in training) goes into
    the error messages, and so does ``rows[i]`` (where completion ``i``'s prompt comes from)
    when given. ``columns``: the data's other columns, a value per completion (TRL passes them
    as keywords), and ``trainer_state`` (its ``global_step``: the optimizer steps done,
    ``global_step``) — each only to a function that takes it by name or through ``**kwargs``.

    As TRL passes them, the completion of a conversational prompt (a message list) reaches a
    reward *function* as one assistant message, ``[{"role": "assistant", "content": text}]``;
    a :class:`RewardModel` takes the text."""
    where = f" at step {step}" if step else ""
    extra = ({"completion_ids": [list(ids) for ids in completion_ids]}
             if completion_ids is not None and _takes(fn, "completion_ids") else {})
    given = list(completions)
    if not isinstance(fn, RewardModel):
        given = [[{"role": "assistant", "content": c}] if isinstance(p, list) else c
                 for p, c in zip(prompts, given, strict=True)]
    elif rows is not None:
        extra["rows"] = list(rows)  # its errors name the completion's row
    if not isinstance(fn, RewardModel):
        for name, values in (columns or {}).items():
            if name not in _RESERVED and name.isidentifier() and _takes(fn, name):
                extra[name] = list(values)
        if _takes(fn, "trainer_state"):
            extra["trainer_state"] = SimpleNamespace(global_step=global_step)
    try:
        values = fn(prompts=list(prompts), completions=given, **extra)
    except DpokitError as error:
        raise DpokitError(f"reward {spec} failed{where}: {error}") from None
    except (Exception, SystemExit) as error:  # sys.exit() in a reward: not a clean exit 0
        raise DpokitError(f"reward {spec} failed{where}: {_one_line(error)}") from None
    # a set has no order (its values would meet other completions) and drops equal ones
    if (isinstance(values, str | bytes | Mapping | AbstractSet) or not hasattr(values, "__iter__")
            or getattr(values, "ndim", 1) == 0):
        raise DpokitError(f"reward {spec} returned {type(values).__name__}, not a list of "
                          f"{len(completions)} numbers{where}")
    try:
        values = list(values)
    except (Exception, SystemExit) as error:  # a generator that raises
        raise DpokitError(f"reward {spec} failed{where}: {_one_line(error)}") from None
    if len(values) != len(completions):
        raise DpokitError(f"reward {spec} returned {len(values)} values for "
                          f"{len(completions)} completions{where}")

    def which(i: int) -> str:
        return f"completion {i}" + (f" ({rows[i]})" if rows is not None else "")

    numbers_ = [_number(v) for v in values]
    bad = next((i for i, v in enumerate(numbers_) if v is None), None)
    if bad is not None:
        raise DpokitError(f"reward {spec} returned a non-number ({_preview(values[bad])}) for "
                          f"{which(bad)}{where}")
    bad = next((i for i, v in enumerate(numbers_) if not math.isfinite(v)), None)
    if bad is not None:
        raise DpokitError(f"reward {spec} returned a non-finite value ({numbers_[bad]}) for "
                          f"{which(bad)}{where}")
    return numbers_


def _preview(value: Any) -> str:
    """A short one-line ``repr`` of a returned value and its type."""
    text = " ".join(repr(value).split())
    return f"{type(value).__name__} {text[:40] + '…' if len(text) > 40 else text}"


def score_groups(fn: RewardFn, spec: str, prompts: Sequence[Any], groups: Sequence[Sequence[Any]],
                 *, step: int, device: Any = None,
                 rows: Sequence[str] | None = None,
                 columns: Sequence[Mapping[str, Any]] | None = None,
                 global_step: int = 0) -> list[float]:
    """:func:`score` of generated completions: ``groups[i]`` are the completions (with ``text``
    and ``ids``) of ``prompts[i]`` (from ``rows[i]``, for the error messages, when given, and
    with the row's other ``columns[i]``: each column's value repeated for each of the prompt's
    completions, None where a row lacks it); one reward per completion, flattened in that
    order. A :class:`RewardModel` is first moved to ``device`` when one is given."""
    if device is not None and isinstance(fn, RewardModel):
        fn.to(device)
    flat = [c for group in groups for c in group]
    where = None if rows is None else [
        f"{row}, generation {j + 1}" for row, group in zip(rows, groups, strict=True)
        for j in range(len(group))]
    by_column = None
    if columns is not None:
        names = list(dict.fromkeys(name for row in columns for name in row))
        by_column = {name: [row.get(name) for row, group in zip(columns, groups, strict=True)
                            for _ in group] for name in names}
    return score(fn, spec, [p for p, group in zip(prompts, groups, strict=True) for _ in group],
                 [c.text for c in flat], step=step, completion_ids=[c.ids for c in flat],
                 rows=where, columns=by_column, global_step=global_step)
