"""Resume = the same run: what a checkpoint records of the run that wrote it, and the check.

The fingerprint is every config key (``config.yaml``'s) except those in :data:`MAY_CHANGE` (and,
offline, :data:`SAMPLING_KEYS`), with
the paths replaced by what they hold: ``model``, ``ref_model`` and a reward-model directory by a
digest of their files (names, sizes, and their contents — whole for files up to 64 MiB, 16
spread 1 MiB blocks beyond), a ``file.py:function`` reward by the file's SHA-256, and ``data``
(with its ``split``) by a digest of the token ids and numbers of every training row
(:func:`items_identity`, read from the item store rather than recomputed), so another file with
the same rows resumes and the same file tokenised differently does not. Resuming with any other
value is an error listing the differing keys; a checkpoint of an older dpokit, whose ``data``
digest is :func:`legacy_items_identity`'s, is compared with that one, and a key it predates
with the value that run had (the key's default, or :data:`BEFORE_THE_KEY`'s).

``max_steps`` and ``num_epochs`` change the run's length: allowed when the learning rate at a
step does not depend on it (``lr_scheduler: constant`` with warmup in absolute ``warmup_steps``
or none), refused otherwise (a linear or cosine schedule would jump).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpokit.config import config_to_dict, field_defaults
from dpokit.digests import update_sampled
from dpokit.errors import DpokitError
from dpokit.hub import locate

MAY_CHANGE = frozenset({
    "output_dir", "resume", "overwrite", "tokenized_cache", "device", "logging_steps",
    "report_to", "run_name", "project", "save_steps",
    "save_total_limit", "save_strategy", "eval_data", "eval_split", "eval_steps",
    "eval_strategy", "per_device_eval_batch_size", "eval_generate",
    "max_nonfinite_steps", "max_row_chars", "max_steps", "num_epochs", "merge_lora",
    "dataset_num_proc", "ddp_timeout",  # how many processes tokenise: the same tokens
    "ddp_find_unused_parameters",  # DDP's search for unused parameters: the same gradients
    # memory and layout: the same numbers within float32 rounding (tested equal)
    "gradient_checkpointing", "selective_checkpointing", "chunk_size", "unpadded",
    "shared_prompt", "padding_free", "precompute_ref_logps", "precompute_ref_batch_size"})
"""Keys a resumed run may set differently: bookkeeping, evaluation, where it runs, its length,
what only the final save reads, and the memory/layout settings that compute the same numbers."""

SAMPLING_KEYS = frozenset({"max_new_tokens", "temperature", "top_p", "top_k", "reward"})
"""What only ``eval_generate`` samples read — unless the run is online, where they make the
training pairs (then they are part of the fingerprint)."""

_CONTENT_KEYS = ("model", "ref_model", "data", "reward")
"""Keys whose fingerprint is a digest of what they name (shown as ``content differs``)."""

_WHOLE_FILE = 64 << 20
_BLOCK = 1 << 20
_BLOCKS = 16


def directory_identity(path: str | Path) -> str:
    """A digest of a model directory's weight, config and tokenizer files (see module doc) —
    for a hub name, its cached snapshot's, so the name and a copy of the snapshot agree; the
    string itself when it is neither."""
    path = locate(path)
    if not path.is_dir():
        return str(path)
    digest = hashlib.sha256()
    from dpokit.models import adapter_base

    base = adapter_base(path)
    if base is not None:  # a PEFT adapter: the base it trains on is part of it
        digest.update(directory_identity(base).encode())
    for file in sorted(path.iterdir()):
        if not file.is_file() or file.suffix not in (".safetensors", ".bin", ".json", ".pt",
                                                     ".model", ".txt"):
            continue
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        update_sampled(digest, file, size, whole_up_to=_WHOLE_FILE, block=_BLOCK,
                       blocks=_BLOCKS)
    return digest.hexdigest()[:32]


ITEMS_DIGEST = "items-v2:"
"""The prefix of :func:`items_identity`'s digests; a checkpoint's ``data`` without it was
written by an older dpokit (:func:`legacy_items_identity`)."""


def items_identity(items: Sequence[Any]) -> str:
    """A digest of every training row's tokens and numbers (not where it was read from): the
    content digest of :mod:`dpokit.data.store` — a list or a store of the same items give the
    same one, and a whole store's is read from the store (O(1)). Items of a class the store
    cannot hold fall back to :func:`legacy_items_identity`."""
    from dpokit.data.store import ItemChain, ItemStore, content_digest, storable

    if isinstance(items, ItemStore | ItemChain) or (
            len(items) and dataclasses.is_dataclass(items[0]) and storable(type(items[0]))):
        return ITEMS_DIGEST + content_digest(items, exclude=("source", "row"))[:32]
    return legacy_items_identity(items)


def legacy_items_identity(items: Sequence[Any]) -> str:
    """The digest checkpoints recorded before :data:`ITEMS_DIGEST` (and items the store cannot
    hold still get): every item's fields but ``source``/``row`` as JSON, one after another (a
    Python pass over every item)."""
    digest = hashlib.sha256()
    for item in items:
        fields = (dataclasses.asdict(item) if dataclasses.is_dataclass(item)
                  else {"item": repr(item)})
        fields.pop("source", None)
        fields.pop("row", None)
        if fields.get("columns") == {}:  # a prompt without other columns: its digest as before
            fields.pop("columns")        # prompts carried them (runs resume across the change)
        digest.update(json.dumps(fields, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:32]


def _reward_identity(spec: str | None) -> str | None:
    from dpokit.hub import locate

    if not spec:
        return spec
    if locate(spec).is_dir():  # a reward-model directory, or its cached snapshot by name
        return directory_identity(spec)
    target, _, name = spec.rpartition(":")
    if target.endswith(".py") and Path(target).is_file():
        return f"{hashlib.sha256(Path(target).read_bytes()).hexdigest()[:32]}:{name}"
    return spec


def run_fingerprint(config: Any, train_items: Sequence[Any], *,
                    autocast: str | None = None) -> dict[str, Any]:
    """``{key: value}`` of everything that determines the run (see the module docstring).
    ``autocast``: the precision the steps really run in (the runtime's: ``fp16`` on a CPU runs
    float32), so that a run resumed on another device type in another precision is refused
    although its config keys are the same."""
    online = bool(getattr(config, "online", False))
    values = {k: v for k, v in config_to_dict(config).items()
              if k not in MAY_CHANGE and (online or k not in SAMPLING_KEYS)}
    if autocast is not None:
        values["autocast"] = autocast
    values.pop("split", None)  # covered by the rows' digest
    values["model"] = directory_identity(config.model)
    if getattr(config, "ref_model", None):
        values["ref_model"] = directory_identity(config.ref_model)
    values["data"] = items_identity(train_items)
    if "reward" in values:
        values["reward"] = _reward_identity(values["reward"])
    return json.loads(json.dumps(values, default=str))  # as trainer_state.json holds it


def _shown(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


BEFORE_THE_KEY = {"disable_dropout": False}
"""What a run did before its checkpoint recorded a key, where that is not the key's default
(dropout stayed on before ``disable_dropout`` existed)."""


def _meaning_before(key: str, current: dict[str, Any]) -> Any:
    """The value ``key`` had in a run whose checkpoint predates it: :data:`BEFORE_THE_KEY`, else
    the field's default in the config that ``current`` is the fingerprint of (as the fingerprint
    holds it); ``current``'s own value where no config has the key."""
    if key in BEFORE_THE_KEY:
        return BEFORE_THE_KEY[key]
    from dpokit.train.config import DPOConfig, SFTConfig

    defaults = field_defaults(DPOConfig if "loss_type" in current else SFTConfig)
    if key in defaults:
        return json.loads(json.dumps(defaults[key], default=str))
    return current.get(key)


def check_same_run(checkpoint: Path, recorded: dict[str, Any] | None,
                   current: dict[str, Any]) -> None:
    """Refuse to resume ``checkpoint`` when the run differs from the one that wrote it. A key
    the checkpoint predates had its default meaning (:func:`_meaning_before`) in that run: the
    resumed run must keep it."""
    if recorded is None:
        return
    if "bf16" not in recorded and "dtype" in recorded:  # written when dtype was the autocast
        old = recorded["dtype"]
        recorded = {**recorded, "dtype": "float32", "bf16": old == "bfloat16",
                    "fp16": old == "float16"}
    differing = []
    online = bool(current.get("online"))
    for key in sorted(set(recorded) | set(current)):
        if key in MAY_CHANGE or (not online and key in SAMPLING_KEYS):
            continue  # (older checkpoints recorded these)
        predates = key not in recorded and key in current
        before = _meaning_before(key, current) if predates else recorded.get(key)
        if before == current.get(key):
            continue
        if key in _CONTENT_KEYS and key in recorded and key in current:
            differing.append(f"{key} (content differs)")
        else:
            differing.append(f"{key} {_shown(before)}"
                             + (" (the checkpoint predates the key)" if predates else "")
                             + f" → {_shown(current.get(key))}")
    if differing:
        raise DpokitError(
            f"resume: this is not the run that wrote {checkpoint}: {'; '.join(differing)}. "
            f"Resume with the checkpoint's values (its config.yaml), or start a new run in "
            f"another --output-dir (keys that may change on resume: "
            f"{', '.join(sorted(MAY_CHANGE))}; offline also the sampling settings and reward "
            f"of eval_generate)")


def check_length(checkpoint: Path, state: dict, config: Any, total_steps: int) -> None:
    """A different ``max_steps``/``num_epochs``: allowed only where the schedule does not
    depend on the total, and never shorter than the steps already taken."""
    recorded = state.get("total_steps", total_steps)
    if recorded == total_steps:
        return
    step = state["global_step"]
    if total_steps < step:
        raise DpokitError(f"resume: {checkpoint} is at step {step}, past this run's "
                          f"{total_steps} steps (max_steps / num_epochs)")
    fixed = config.lr_scheduler == "constant" and (config.warmup_steps >= 1 or (
        config.warmup_steps == 0 and config.warmup_ratio == 0))
    if not fixed:
        raise DpokitError(
            f"resume: {checkpoint} was written by a run of {recorded} steps, this one has "
            f"{total_steps} (max_steps / num_epochs); with lr_scheduler {config.lr_scheduler}"
            + (" and warmup_ratio" if config.lr_scheduler == "constant" else "")
            + " the learning rate at each step depends on the total, so it would jump. Resume "
              "with the checkpoint's length, or use lr_scheduler constant with warmup_steps")
