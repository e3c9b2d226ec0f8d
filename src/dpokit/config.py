"""Typed dataclass configs that map 1:1 to YAML files and to command-line flags.

A config is a dataclass whose fields carry a default and ``metadata={"help": ...}``. The same
field is the YAML key ``output_dir`` and the flag ``--output-dir`` (``--output_dir`` works too);
flags override the file. Values are checked against the field's type hint (int, float, str,
bool, ``X | None``, ``Literal[...]``, ``list[X]``) before anything is loaded, and every error is a
one-line :class:`~dpokit.errors.DpokitError` naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from dpokit.errors import DpokitError
from dpokit.trl_config import is_trl, read_trl, trl_defaults

C = TypeVar("C")
_MISSING = dataclasses.MISSING


def field(default: Any = _MISSING, *, help: str, default_factory: Any = _MISSING,
          aliases: Sequence[str] = ()) -> Any:
    """A config field: its default, its help text (shown by ``--help``) and extra flag
    spellings (``aliases=("-b",)``) besides ``--field-name`` and ``--field_name``."""
    metadata = {"help": help, "aliases": tuple(aliases)}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class Config:
    """Base of dpokit's config dataclasses: ``validate()`` chains through every concern.

    Each concern (model, data, loss, optimisation, …) is a keyword-only dataclass deriving from
    this; a command's config inherits the concerns it needs, and its ``validate`` runs all of
    theirs (each calls ``super().validate()`` first).
    """

    def validate(self) -> None:
        """Reject impossible values with a one-line ``DpokitError`` naming the key."""


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (types.UnionType, typing.Union):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is list:
        return f"list of {_describe(args[0])}"
    return getattr(hint, "__name__", str(hint))


_TRUE, _FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}


def split_list_text(text: str) -> list:
    """A list from command-line text: a YAML list ``[a, b]``, or ``a,b`` split at commas."""
    parsed = yaml.safe_load(text) if text.strip().startswith("[") else None
    if isinstance(parsed, list):
        return parsed
    return [part.strip() for part in text.split(",") if part.strip()]


def _names(hint: Any, text: str) -> bool:
    """Whether ``text`` is one of the literal values of ``hint`` (or of its list's items)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        return _names(args[0], text)
    return origin is Literal and text in args


def coerce(key: str, value: Any, hint: Any, *, from_text: bool = False) -> Any:
    """``value`` as the type ``hint`` of field ``key``, or a ``DpokitError`` naming the key.

    ``from_text`` is for command-line strings: ``"3"`` → 3, ``"none"`` → None, ``"a,b"`` → a list.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    wrong = DpokitError(f"{key}: expected {_describe(hint)}, got {value!r}")
    if origin in (types.UnionType, typing.Union):
        named = from_text and any(_names(arg, str(value)) for arg in args)
        if value is None or (from_text and str(value).lower() in ("none", "null")
                             and not named):  # ("none" of report_to is a tracker list's)
            if type(None) in args:
                return None
            raise wrong
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(key, value, arg, from_text=from_text)
            except DpokitError:
                continue
        raise wrong
    if origin is Literal:
        if value in args:
            return value
        raise DpokitError(f"{key}: expected one of {', '.join(map(repr, args))}, got {value!r}")
    if origin is list:
        if from_text and isinstance(value, str):
            value = split_list_text(value)
        elif isinstance(value, str) and _names(hint, value):  # YAML's `report_to: none`
            value = [value]
        if not isinstance(value, list | tuple):
            raise wrong
        return [coerce(key, item, args[0], from_text=from_text) for item in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if from_text and str(value).lower() in _TRUE | _FALSE:
            return str(value).lower() in _TRUE
        raise wrong
    if hint in (int, float):
        if isinstance(value, bool):
            raise wrong
        if isinstance(value, int) or (hint is float and isinstance(value, float)):
            return hint(value)
        if from_text or isinstance(value, str):
            try:
                return hint(str(value))
            except ValueError:
                raise wrong from None
        raise wrong
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise wrong
    raise TypeError(f"config field {key} has unsupported type {hint!r}")  # programming error


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path`` (``yaml.safe_load``); anything else is a user error."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise DpokitError(f"cannot read config {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise DpokitError(f"{path}: not a UTF-8 text file") from None
    try:
        document = yaml.load(text, Loader=_UniqueKeyLoader)  # safe_load's, keys checked
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise DpokitError(f"{path}{where}: not valid YAML "
                          f"({getattr(error, 'problem', None) or error})") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise DpokitError(f"{path}: expected a mapping of config keys, got "
                          f"{type(document).__name__}")
    names: dict[str, Any] = {}
    for key in document:
        if not isinstance(key, str):
            raise DpokitError(f"{path}: key {key!r} is not a name (config keys are strings)")
        name = key.replace("-", "_")
        if name in names:
            raise DpokitError(f"{path}: {names[name]!r} and {key!r} are the same key; keep one")
        names[name] = key
    return document


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` refusing a key given twice in one mapping (safe_load keeps the
    last silently)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def build_config(cls: type[C], values: Mapping[str, Any], *, source: str = "config",
                 from_text: Sequence[str] = ()) -> C:
    """Instantiate ``cls`` from a mapping: unknown keys, wrong types and missing required keys
    are ``DpokitError`` s naming the key; then the config's own ``validate()`` runs."""
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=3)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise DpokitError(f"{source}: unknown key {key!r}{hint}")
        kwargs[name] = coerce(name, value, hints[name], from_text=key in from_text)
    for name, f in fields.items():
        if (name not in kwargs and f.default is _MISSING
                and f.default_factory is _MISSING):
            raise DpokitError(f"{source}: {name} is required (--{name.replace('_', '-')})")
    config = cls(**kwargs)
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


class UnknownFlags(DpokitError):
    """Flags that are neither the config's nor, with a TRL config, TRL's (``flags``: their
    keys; ``close``: the config's fields closest to them)."""

    def __init__(self, flags: list[str], known: Sequence[str]):
        self.flags = flags
        self.close = [m for k in flags for m in difflib.get_close_matches(k, list(known), n=2)]
        hint = f" (did you mean {' or '.join('--' + m.replace('_', '-') for m in self.close)}?)"
        super().__init__(f"No such option: {', '.join('--' + k for k in flags)}"
                         f"{hint if self.close else ''}")


def load_config(cls: type[C], path: str | Path | None = None,
                overrides: Mapping[str, str] | None = None,
                trl_flags: Mapping[str, Any] | None = None) -> C:
    """The YAML file at ``path`` (optional) with command-line ``overrides`` (text) on top.

    ``trl_flags``: flags under TRL's names (``--per_device_train_batch_size 4``, values read
    as ``TrlParser`` reads them, :func:`dpokit.cli.options.trl_flag_values`), for a TRL
    config: they override the file's keys before it is read with TRL's meanings, as ``trl dpo
    --config dpo.yaml --per_device_train_batch_size 4`` does; dpokit-named flags go on top."""
    values: dict[str, Any] = {}
    source = "config"
    trl = False
    known = [f.name for f in dataclasses.fields(cls)]
    document: dict[str, Any] = {}
    if path is not None:
        document = read_yaml(path)
        source = str(path)
    if trl_flags:
        document = {**{k.replace("-", "_"): v for k, v in document.items()}, **trl_flags}
        if not is_trl(document):
            raise UnknownFlags(list(trl_flags), known)
        source = f"{source} and TRL flags" if path is not None else "TRL flags"
    texts = {k.replace("-", "_"): v for k, v in (overrides or {}).items()}
    if document:
        if is_trl(document):  # a TRL config, read with TRL's names and meanings
            if "lora" in texts and "lora" in known:  # dpokit's --lora/--no-lora is TRL's
                # --use_peft: it decides whether the file's lora_* keys are read (as TrlParser
                # merges --use_peft over the file before TRL reads them)
                document = {**document, "use_peft": coerce("lora", texts["lora"], bool,
                                                            from_text=True)}
            document = read_trl(document, source=source, known=known, defaults=False)
            trl = True
        values.update({k.replace("-", "_"): v for k, v in document.items()})
    values.update(texts)
    if trl:  # TRL's defaults for what neither the file nor a flag set (flags decide some)
        hints = _hints(cls)

        def given(key: str) -> Any:
            if key not in values or key not in hints:
                return values.get(key)
            return coerce(key, values[key], hints[key], from_text=key in texts)

        for key, default in trl_defaults(given, known).items():
            values.setdefault(key, default)
    return build_config(cls, values, source=source, from_text=tuple(texts))


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain ``{field: value}`` of a config, ready for ``yaml.safe_dump``."""
    return dataclasses.asdict(config)


def config_yaml(config: Any) -> str:
    """The resolved config as YAML text (what ``config.yaml`` holds)."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


def write_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (through a temporary file and a rename)."""
    from dpokit.atomic import write_text

    write_text(path, config_yaml(config))


def field_defaults(cls: Any) -> dict[str, Any]:
    """``{field: default}`` of a config dataclass (or instance), for the fields that have one
    (a ``default_factory``'s value made fresh)."""
    defaults = {}
    for f in dataclasses.fields(cls):
        if f.default is not _MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not _MISSING:
            defaults[f.name] = f.default_factory()
    return defaults


def field_help(cls: type) -> list[tuple[str, str, Any, str]]:
    """``(flag, type description, default, help)`` for every field, in declaration order."""
    hints = _hints(cls)
    defaults = field_defaults(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = defaults.get(f.name, "(required)")
        rows.append((f"--{f.name.replace('_', '-')}", _describe(hints[f.name]), default,
                     f.metadata.get("help", "")))
    return rows
