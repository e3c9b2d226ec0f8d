"""Load users' Hugging Face causal LMs and tokenizers from disk — never from the network.

A model is a local directory, or a hub name (``Org/Name[@revision]``) already in the Hugging Face
cache (:mod:`dpokit.hub`). ``local_files_only`` is always on (no network at run time),
``trust_remote_code`` is off unless asked for, and a missing or malformed directory is a
:class:`~dpokit.errors.DpokitError` with a one-line message.

A model may also be a PEFT adapter directory (``adapter_config.json`` and the adapter's
weights, e.g. the ``final/`` of a LoRA run): its base is the ``base_model_name_or_path`` it
names, found the same way. :func:`load_causal_lm` gives base + adapter merged (to evaluate or
generate), :func:`load_adapter` the adapter on a loaded base, trainable or not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpokit.errors import DpokitError
from dpokit.hub import locate, resolve

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


def resolve_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` → ``torch.bfloat16``; unknown names are a user error."""
    try:
        return DTYPES[name]
    except KeyError:
        raise DpokitError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}") from None


def _model_dir(path: str | Path, what: str) -> Path:
    """The model directory ``path`` names: itself, or the cached snapshot of a hub name."""
    directory = resolve(path, what=what, logger="dpokit.models")
    if not directory.exists():
        raise DpokitError(f"{what} directory not found: {directory} (dpokit loads local "
                          f"directories, or Org/Name models already in the Hugging Face cache; "
                          f"download or save the model first)")
    if not directory.is_dir():
        raise DpokitError(f"{what} path is not a directory: {directory}")
    if not (directory / "config.json").is_file():
        raise DpokitError(f"{directory} is not a Hugging Face model directory (no config.json)")
    return directory


ADAPTER_CONFIG = "adapter_config.json"
FULL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
"""A directory with one of these holds a whole model, even beside an ``adapter_config.json``."""


def _read_json(file: Path) -> Any:
    """A JSON file's content; unreadable or invalid is one line naming it."""
    import json

    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DpokitError(f"cannot read {file}: "
                          f"{getattr(error, 'strerror', None) or error}") from None


def _adapter_config(directory: Path) -> dict | None:
    """``adapter_config.json`` of a PEFT adapter directory (one without full weights; a
    ``config.json`` beside it may be there or not), or None for any other path."""

    file = directory / ADAPTER_CONFIG
    if not file.is_file() or any((directory / name).is_file() for name in FULL_WEIGHTS):
        return None
    settings = _read_json(file)
    if not isinstance(settings, dict):
        raise DpokitError(f"{file} is not a JSON object")
    return settings


def read_adapter_config(path: str | Path) -> dict | None:
    """The ``adapter_config.json`` of ``path`` when it is a PEFT adapter directory (or a hub
    name's cached snapshot of one), else None — for configs, so nothing is logged or refused
    for a path that does not exist."""
    return _adapter_config(locate(path))


def adapter_base(path: str | Path, *, what: str = "model") -> Path | None:
    """The base model directory of the PEFT adapter ``path`` names, or None when ``path`` is no
    adapter. The base is its ``base_model_name_or_path`` — a directory (relative ones from
    where dpokit runs, as the training run that wrote it and PEFT read it) or a cached hub
    name; one that does not resolve to a model directory is a one-line error naming both."""
    directory = resolve(path, what=what, logger="dpokit.models")
    settings = _adapter_config(directory)
    if settings is None:
        return None
    base = settings.get("base_model_name_or_path")
    fix = (f"set base_model_name_or_path in {directory / ADAPTER_CONFIG} to the base model's "
           f"directory or a cached Org/Name")
    if not isinstance(base, str) or not base:
        raise DpokitError(f"{what} {directory} is a PEFT adapter that names no base model; {fix}")
    try:
        return _model_dir(base, "base model")
    except DpokitError as error:
        raise DpokitError(f"{what} {directory} is a PEFT adapter on base model {base}, which "
                          f"cannot be used ({error}); {fix}") from None


def config_dir(path: str | Path, *, what: str = "model") -> Path:
    """The directory whose ``config.json`` describes the model ``path`` names: the model's, or
    for a PEFT adapter its base's."""
    return adapter_base(path, what=what) or _model_dir(path, what)


POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")
"""Where a model's config states how many positions it has (Llama/Qwen, GPT-2, others)."""


def position_limit(path: str | Path, *, what: str = "model") -> tuple[int, str] | None:
    """``(positions, key)`` from the ``config.json`` of a model directory (an adapter's base) —
    read without loading any weights, extended by its ``rope_scaling`` — or None when it states
    none."""

    return _positions(_read_json(config_dir(path, what=what) / "config.json"))


def _positions(config: dict) -> tuple[int, str] | None:
    """:func:`position_limit` of a read ``config.json``."""
    sources = [config, config.get("text_config") or {}]
    for source in sources:
        for key in POSITION_KEYS:
            if isinstance(source.get(key), int) and source[key] > 0:
                return max(source[key], _scaled_positions(source)), key
    return None


def _scaled_positions(config: dict) -> int:
    """The context a ``rope_scaling`` entry extends to (original positions × factor, e.g.
    Qwen's YaRN factor 4 over 32,768), or 0 without one."""
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(scaling, dict):
        return 0
    factor = scaling.get("factor")
    original = scaling.get("original_max_position_embeddings")
    if isinstance(factor, int | float) and isinstance(original, int) and factor > 1:
        return int(original * factor)
    return 0


ROW_MASK_TYPES: frozenset[str] = frozenset()
"""Model types whose attention slices a causal-mask buffer of ``max_position_embeddings`` by the
row's length, not by its position ids, *and* that take the shared-prompt layout: a shared row
p + c + r must fit in it. None today: GPT-Neo, the family found to slice so (16 positions failed
on a pair of 6 + 6 + 6 tokens), is not in :data:`dpokit.logps.LAYOUT_MODEL_TYPES`, so its shared
batches run padded, each completion its own row of p + c tokens."""


def position_limits(config: Any) -> list[tuple[int, str, str, bool]]:
    """``(positions, config key, model dir, whole row)`` of a config's ``model`` and
    ``ref_model`` (read from their ``config.json``; ``whole row``: a :data:`ROW_MASK_TYPES`
    model), after checking ``max_length`` against them."""
    limits = []
    for what, path in (("model", config.model), ("ref_model", getattr(config, "ref_model", None))):
        settings = _read_json(config_dir(path, what=what) / "config.json") if path else {}
        found = _positions(settings)
        if found is None:
            continue
        positions, key = found
        if config.max_length is not None and config.max_length > positions:
            raise DpokitError(f"max_length {config.max_length} is longer than {what} {path} "
                              f"has positions ({key} = {positions} in its config.json); set "
                              f"max_length ≤ {positions}")
        limits.append((positions, key, str(path), settings.get("model_type") in ROW_MASK_TYPES))
    return limits


def positions_needed(item: Any, max_new_tokens: int, *, whole_row: bool = False) -> int:
    """The longest sequence one example puts through the model: a pair's prompt and longer
    completion (``whole_row``: the shared-prompt row, prompt and both completions), an SFT
    prompt and completion, an online prompt and ``max_new_tokens``."""
    prompt = len(item.prompt_ids)
    if hasattr(item, "chosen_ids"):
        if whole_row:
            return prompt + len(item.chosen_ids) + len(item.rejected_ids)
        return prompt + max(len(item.chosen_ids), len(item.rejected_ids))
    if hasattr(item, "completion_ids"):
        return prompt + len(item.completion_ids)
    return prompt + max_new_tokens


def _positions_needed_all(items: Any, max_new_tokens: int, *, whole_row: bool) -> Any:
    """:func:`positions_needed` of every item (an int64 array); for an item store, from its
    stored lengths (:mod:`dpokit.data.store`), without building the items."""
    import numpy as np

    from dpokit.data.store import ItemChain, ItemStore, lengths

    if not isinstance(items, ItemStore | ItemChain):
        needed = np.array([positions_needed(item, max_new_tokens, whole_row=whole_row)
                           for item in items], dtype=np.int64)
        return group_rows_needed(items, needed) if whole_row and len(items) else needed
    prompt, sample = lengths(items, "prompt_ids"), items[0]
    if hasattr(sample, "chosen_ids"):
        chosen, rejected = lengths(items, "chosen_ids"), lengths(items, "rejected_ids")
        if whole_row:
            return group_rows_needed(items, prompt + chosen + rejected)
        return prompt + np.maximum(chosen, rejected)
    if hasattr(sample, "completion_ids"):
        return prompt + lengths(items, "completion_ids")
    return prompt + max_new_tokens


def group_rows_needed(items: Any, needed: Any) -> Any:
    """``needed`` with each pair of a group (k completions of one prompt) given its group's
    shared-prompt row, prompt + every distinct completion of the group once."""
    import numpy as np

    from dpokit.data.batching import group_ids

    if not hasattr(items[0], "chosen_ids"):
        return needed
    groups = group_ids(items)
    members = np.flatnonzero(groups >= 0)
    if not len(members):
        return needed
    rows: dict[tuple, tuple[int, set]] = {}
    for j in members.tolist():
        item = items[j]
        prompt, seen = rows.setdefault((int(groups[j]), tuple(item.prompt_ids)),
                                       (len(item.prompt_ids), set()))
        seen.update((tuple(item.chosen_ids), tuple(item.rejected_ids)))
    needed = np.array(needed, dtype=np.int64)
    for j in members.tolist():
        item = items[j]
        prompt, seen = rows[(int(groups[j]), tuple(item.prompt_ids))]
        needed[j] = prompt + sum(len(c) for c in seen)
    return needed


def check_positions(items: list, limits: list[tuple[int, str, str, bool]],
                    max_new_tokens: int, layout: str = "padded") -> None:
    """No example may be longer than a model's positions (Llama would run past them silently,
    GPT-2 fail with an IndexError): one line naming the row. In the shared-prompt ``layout`` a
    :data:`ROW_MASK_TYPES` model needs the whole row (prompt and both completions) to fit."""
    if not limits or not items:
        return
    for positions, key, path, row_mask in sorted(limits):
        whole = row_mask and layout == "shared"
        needed = _positions_needed_all(items, max_new_tokens, whole_row=whole)
        longest = int(needed.argmax())  # the first of the longest, as max() picks
        if needed[longest] <= positions:
            continue
        item = items[longest]
        online = not hasattr(item, "chosen_ids") and not hasattr(item, "completion_ids")
        grouped = getattr(item, "group", -1) >= 0
        completions = "every completion of its group" if grouped else "both completions"
        what = (f"its prompt and {completions}: this model's attention mask spans the "
                "shared-prompt row" if whole else
                "its prompt and max_new_tokens" if online else "it")
        fix = ("; or set shared_prompt: false (a row per completion)" if whole else "")
        raise DpokitError(f"{item.source}, row {item.row}: {needed[longest]} tokens ({what}), "
                          f"longer than {path} has positions ({key} = {positions}); set "
                          f"max_length (or max_prompt_length) ≤ {positions}"
                          + (" with max_new_tokens" if online else "") + fix)


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved in ``path`` (a directory, or a hub name's cached snapshot; a PEFT
    adapter saved without one: its base's); a missing pad token falls back to EOS."""
    from transformers import AutoTokenizer

    directory = resolve(path, what="model", logger="dpokit.models")  # a hub name: its snapshot
    if directory.is_dir() and not (directory / "tokenizer_config.json").is_file():
        directory = adapter_base(directory) or directory
    if not directory.is_dir():
        raise DpokitError(f"tokenizer directory not found: {directory}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True,
                                                  trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise DpokitError(f"cannot load a tokenizer from {directory}: "
                          f"{_first_line(error, trust_remote_code)}") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise DpokitError(f"the tokenizer in {directory} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element of ``tensor`` is finite, in one read pass: a sum with a NaN or
    ±inf in it is NaN or ±inf (IEEE arithmetic), so a finite sum means finite elements; only a
    non-finite sum — a NaN, an inf, or finite numbers whose sum overflows — is checked element
    by element. (``torch.isfinite(t).all()`` makes several passes and a temporary of the
    tensor's size: ~20× the time on a CPU, seconds a save on a 7 B model.) Half-precision sums
    accumulate in float32."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return True
    half = tensor.dtype in (torch.float16, torch.bfloat16)
    if bool(torch.isfinite(tensor.sum(dtype=torch.float32 if half else None))):
        return True
    return bool(torch.isfinite(tensor).all())


def nonfinite_parameter(model: Any) -> str | None:
    """The name of the first parameter holding a NaN or ±inf (this process's shard under FSDP),
    or None when every one is finite (:func:`all_finite`)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            if not all_finite(local):
                return name
    return None


def weights_dtype(path: str | Path, dtype: str, *, what: str = "model") -> str:
    """The load dtype ``dtype`` means for the model ``path`` names: ``dtype`` itself, or for
    ``auto`` the dtype its ``config.json`` (an adapter's base's) names — ``dtype`` (transformers
    5) or ``torch_dtype`` — and float32 when it names none of float32, bfloat16, float16."""
    if dtype != "auto":
        return dtype
    config = _read_json(config_dir(path, what=what) / "config.json")
    for source in (config, config.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if source.get(key) in ("float32", "bfloat16", "float16"):
                return source[key]
    return "float32"


def _first_line(error: Exception, trust_remote_code: bool) -> str:
    """The first line of a ``from_pretrained`` error (all its lines, joined, when the first
    only introduces the next); for code shipped in the directory (its
    ``auto_map``), refused because ``trust_remote_code`` is off, what to set — the line
    transformers gives says where the code is, its next lines how to allow it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first = lines[0] if lines else type(error).__name__
    if first.endswith(":"):  # a list follows ("… from one of: (1) …"): all of it, one line
        first = " ".join(lines)
    if not trust_remote_code and "contains custom code" in str(error):
        first += (" Its code was not run: set trust_remote_code: true (--trust-remote-code) "
                  "only if you trust it")
    return first


def _from_pretrained(auto_class: Any, path: str | Path, *, what: str, kind: str, dtype: str,
                     device: str | torch.device, trust_remote_code: bool) -> Any:
    """``auto_class.from_pretrained`` of a local directory (no network), one-line errors, its
    weights checked finite, in ``dtype`` on ``device``, eval mode."""
    from transformers.utils import logging as hf_logging

    directory = _model_dir(path, what)
    hf_logging.disable_progress_bar()
    try:
        model, info = auto_class.from_pretrained(
            directory, dtype=resolve_dtype(weights_dtype(directory, dtype)),
            local_files_only=True, trust_remote_code=trust_remote_code, output_loading_info=True)
    except (OSError, ValueError, KeyError) as error:
        raise DpokitError(f"cannot load a {kind} from {directory}: "
                          f"{_first_line(error, trust_remote_code)}") from None
    except Exception as error:
        if type(error).__name__ != "SafetensorError":  # a truncated or garbled weights file
            raise
        files = ", ".join(sorted(p.name for p in directory.glob("*.safetensors")))
        raise DpokitError(f"cannot load a {kind} from {directory}: its weights ({files}) are "
                          f"corrupt: {str(error).splitlines()[0]}") from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:  # transformers initialised them at random, with a warning only
        raise DpokitError(f"{directory}: its weights lack {len(missing)} tensor"
                          f"{'s' if len(missing) > 1 else ''} of the {type(model).__name__} its "
                          f"config.json describes ({', '.join(missing[:3])}"
                          f"{', …' if len(missing) > 3 else ''}), which would start at random; "
                          f"the {what} directory is incomplete or not a {kind}")
    bad = nonfinite_parameter(model)
    if bad is not None:
        raise DpokitError(f"{directory}: weight {bad} holds NaN or inf values; the {what} is "
                          f"corrupt or came from a diverged run")
    if Path(path).exists():  # a local path: absolute, so adapters trained on it name their
        model.name_or_path = str(Path(path).resolve())  # base from any directory (peft reads
        model.config._name_or_path = model.name_or_path  # the former, transformers the latter)
    return model.to(device).eval()


def load_causal_lm(path: str | Path, *, dtype: str = "float32", device: str | torch.device = "cpu",
                   trust_remote_code: bool = False, what: str = "model") -> Any:
    """``AutoModelForCausalLM`` from a local directory, in ``dtype`` (a name, or ``auto``:
    :func:`weights_dtype`) on ``device``, eval mode; a PEFT adapter directory gives its base
    with the adapter merged in (a plain model)."""
    from transformers import AutoModelForCausalLM

    base = adapter_base(path, what=what)
    model = _from_pretrained(AutoModelForCausalLM, base or path, what=what, kind="causal LM",
                             dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    if base is None:
        return model
    return merge_adapter(load_adapter(model, path, what=what))


def merge_adapter(peft_model: Any) -> Any:
    """``peft_model.merge_and_unload()`` (a plain model, eval mode), right for a model whose
    output head is tied to its token embedding (GPT-2, small Qwen, Gemma): peft merges LoRA into
    the weight in place, so an adapter on ``lm_head`` (or on the embedding) would change both
    ends of the one shared matrix. The head gets a copy of it first; the merged model is then
    untied, and peft's merge sets its config's ``tie_word_embeddings`` false, so
    ``save_pretrained`` keeps both matrices and ``from_pretrained`` does not tie them again."""
    inner = peft_model.get_base_model()
    inputs, outputs = inner.get_input_embeddings(), inner.get_output_embeddings()
    if inputs is not None and outputs is not None:
        in_owner, out_owner = _weight_owner(inputs), _weight_owner(outputs)
        shared = (isinstance(getattr(in_owner, "weight", None), nn.Parameter)
                  and getattr(out_owner, "weight", None) is in_owner.weight)
        if shared and (in_owner is not inputs or out_owner is not outputs):  # a LoRA on one
            weight = out_owner.weight
            out_owner.weight = nn.Parameter(weight.detach().clone(),
                                            requires_grad=weight.requires_grad)
    return peft_model.merge_and_unload().eval()  # peft unties the config of an untied result


def _weight_owner(module: nn.Module) -> nn.Module:
    """The module holding ``module``'s weight: a peft layer's base layer, else itself."""
    base = getattr(module, "get_base_layer", None)
    return base() if callable(base) else module


def load_adapter(model: Any, path: str | Path, *, trainable: bool = False,
                 what: str = "model") -> Any:
    """``peft.PeftModel.from_pretrained(model, path)``: the adapter saved in ``path`` (its own
    rank, scaling and target modules) on the loaded base ``model``, its weights checked finite;
    with ``trainable`` only the adapter's parameters require gradients."""
    from peft import PeftModel, get_peft_model_state_dict

    directory = resolve(path, what=what, logger="dpokit.models")
    saved = _saved_adapter_keys(directory)  # first: a garbled file is one line, not peft's raise
    try:
        peft_model = PeftModel.from_pretrained(model, directory, is_trainable=trainable,
                                               torch_device=str(model.device))
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise DpokitError(f"cannot load the PEFT adapter in {directory} onto its base: "
                          f"{str(error).splitlines()[0]}") from None
    loaded = get_peft_model_state_dict(peft_model)
    if saved is not None and saved != set(loaded):
        # peft fills what the file lacks with its initial values (a warning at most) and drops
        # what the model has no place for, silently: either is another model than was saved
        missing, unknown = sorted(set(loaded) - saved), sorted(saved - set(loaded))
        parts = [f"{len(keys)} {label} ({', '.join(keys[:2])}{', …' if len(keys) > 2 else ''})"
                 for keys, label in ((missing, "missing"), (unknown, "with no place in the model"))
                 if keys]
        raise DpokitError(f"{directory}: the adapter's weights do not match its "
                          f"{ADAPTER_CONFIG} on its base model: {'; '.join(parts)}; the adapter "
                          f"file is incomplete or belongs to another config or base")
    for name, tensor in loaded.items():
        if not bool(torch.isfinite(tensor).all()):
            raise DpokitError(f"{directory}: adapter weight {name} holds NaN or inf values; the "
                              f"adapter is corrupt or came from a diverged run")
    return peft_model if trainable else peft_model.eval()


def _saved_adapter_keys(directory: Path) -> set[str] | None:
    """The tensor names in the adapter file of ``directory`` (read from the safetensors header,
    no weights), or None for a pickled ``adapter_model.bin`` (not inspected)."""
    from safetensors import safe_open

    file = directory / "adapter_model.safetensors"
    if not file.is_file():
        return None
    try:
        with safe_open(str(file), framework="pt") as handle:
            return set(handle.keys())
    except Exception as error:  # SafetensorError: a truncated or garbled file
        raise DpokitError(f"cannot read the PEFT adapter {file}: it is corrupt: "
                          f"{str(error).splitlines()[0]}") from None


def load_reward_model(path: str | Path, *, dtype: str = "float32",
                      device: str | torch.device = "cpu",
                      trust_remote_code: bool = False) -> Any:
    """``AutoModelForSequenceClassification`` with one output (a scalar reward) from a local
    directory, in ``dtype`` on ``device``, eval mode."""
    from transformers import AutoModelForSequenceClassification

    model = _from_pretrained(AutoModelForSequenceClassification, path, what="reward model",
                             kind="sequence-classification reward model", dtype=dtype,
                             device=device, trust_remote_code=trust_remote_code)
    if model.config.num_labels != 1:
        raise DpokitError(f"reward model {Path(path)} has {model.config.num_labels} outputs; a "
                          f"reward model has one (num_labels: 1)")
    return model
