"""Commands whose flags are generated from a config dataclass (``dpokit.config``).

Every field ``output_dir`` becomes ``--output-dir`` (``--output_dir`` too, plus any ``aliases`` of
the field), with the field's help text, type and default; booleans are ``--x/--no-x``; an optional
(``bool | None``) one is also ``--x true|false|auto`` (auto: null, its automatic choice) and
stays null unless given; list fields take ``a,b``, a YAML list ``[a, b]`` or the flag repeated.
``--config FILE`` reads the same keys from YAML; flags override it. The resolved config is
validated before the command's function runs.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import click
import yaml

from dpokit.config import UnknownFlags, field_help, load_config, split_list_text
from dpokit.errors import DpokitError
from dpokit.trl_config import TRL_ONLY

NO = "__no"
"""The parameter-name suffix of an optional boolean's ``--no-x`` flag."""


def _is_list(hint: Any) -> bool:
    """``list[X]`` or ``list[X] | None``: the flag may be repeated."""
    return typing.get_origin(hint) is list or any(
        typing.get_origin(arg) is list for arg in typing.get_args(hint))


def _check_list_text(key: str, text: str) -> None:
    """A list flag's ``[a, b]`` must be valid YAML: its parse error would otherwise escape
    ``split_list_text`` as a traceback (``--loss-type "[sigmoid"``)."""
    if not text.strip().startswith("["):
        return
    try:
        yaml.safe_load(text)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or "not valid YAML"
        raise DpokitError(f"{key}: {text!r} is not a YAML list ({problem}); give a,b or "
                          f"[a, b]") from None


def _params(config_cls: type) -> list[click.Parameter]:
    """``--config`` and one click option per field of ``config_cls``."""
    hints = typing.get_type_hints(config_cls)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    params: list[click.Parameter] = [click.Option(
        ["--config", "config_path"], type=click.Path(path_type=Path), default=None,
        help="YAML file of the keys below (the flag names without --); flags override it.")]
    for flag, kind, default, text in field_help(config_cls):
        key = flag[2:].replace("-", "_")
        aliases = list(fields[key].metadata.get("aliases", ()))
        shown = "required" if default == "(required)" else f"default: {default!r}"
        if hints[key] is bool:
            decls = [f"{flag}/--no-{flag[2:]}", *aliases, key]
            if "_" in key:
                decls.insert(1, f"--{key}/--no_{key}")
            params.append(click.Option(decls, default=None, help=f"{text} [{shown}]"))
            continue
        if hints[key] == bool | None:  # --x (true), --x false, --x auto (null), --no-x
            decls = [flag, *([f"--{key}"] if "_" in key else []), *aliases, key]
            params.append(click.Option(
                decls, is_flag=False, flag_value="true", default=None, metavar="[true|false|auto]",
                type=click.Choice(["true", "false", "auto", "null"], case_sensitive=False),
                help=f"{text} Alone: true; auto: null, the automatic choice. [{shown}]"))
            no = [f"--no-{flag[2:]}", *([f"--no_{key}"] if "_" in key else [])]
            params.append(click.Option([*no, key + NO], is_flag=True, default=False,
                                       help=f"The same as {flag} false."))
            continue
        decls = [flag, *([f"--{key}"] if "_" in key else []), *aliases, key]
        metavar = kind.upper() if " " not in kind else "VALUE"
        params.append(click.Option(decls, default=None, metavar=metavar,
                                   multiple=_is_list(hints[key]),
                                   help=f"{text} ({kind}) [{shown}]"))
    return params


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?(inf|nan)",
                     re.IGNORECASE)


def _trl_value(text: str) -> Any:
    """One TRL flag value as ``TrlParser``'s typed fields read it: YAML's scalars, and numbers
    YAML 1.1 leaves as text (``5e-7``)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    return value if isinstance(value, str | int | float | bool) or value is None else text


def trl_flag_values(args: list[str], known: Collection[str] = ()) -> dict[str, Any]:
    """The flags dpokit does not have, read under TRL's names as ``trl dpo`` takes them:
    ``--key value``, ``--key=value``, ``--key v1 v2`` (a list), ``--flag`` alone (true) and
    ``--no_flag`` (false, for a TRL key or one of ``known``); dashes or underscores. A value
    before any flag is a usage error."""
    flags: dict[str, Any] = {}
    key, given = None, []

    def close() -> None:
        if key is None:
            return
        if not given:  # a boolean flag alone
            if key.startswith("no_") and (key[3:] in TRL_ONLY or key[3:] in known):
                flags[key[3:]] = False
            else:
                flags[key] = True
        else:
            values = [_trl_value(text) for text in given]
            flags[key] = values[0] if len(values) == 1 else values

    for arg in args:
        if arg.startswith("--") and len(arg) > 2 and not _NUMBER.fullmatch(arg[2:]):
            close()
            name, sep, text = arg[2:].partition("=")
            key, given = name.replace("-", "_"), ([text] if sep else [])
        elif key is None:
            raise click.UsageError(f"unexpected argument {arg!r}")
        else:
            given.append(arg)
    close()
    return flags


def config_command(name: str, config_cls: type, run: Callable[[Any], None], *,
                   summary: str, trl_names: bool = False) -> click.Command:
    """A click command: flags from ``config_cls``, ``--config`` YAML, then ``run(config)``.
    ``trl_names``: flags dpokit does not have are read under TRL's names
    (:func:`trl_flag_values`), for a TRL config (``train``, ``sft``)."""

    def callback(config_path: Path | None, **flags: Any) -> None:
        """Flags given (as text) over the YAML file, validated, then ``run``."""
        trl_flags = (trl_flag_values(click.get_current_context().args,
                                     [f.name for f in dataclasses.fields(config_cls)])
                     if trl_names else None)
        overrides = {}
        optional = [k[:-len(NO)] for k in flags if k.endswith(NO)]  # the bool | None fields
        for name in optional:
            no = flags.pop(name + NO)
            if no and flags[name] not in (None, "false"):
                raise click.UsageError(f"--{name.replace('_', '-')} {flags[name]} and "
                                       f"--no-{name.replace('_', '-')} contradict each other")
            if no:
                flags[name] = "false"
        for key, value in flags.items():
            if value is None or value == ():
                continue
            if key in optional and value == "auto":
                value = "null"
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, tuple):  # a list flag: each occurrence is one text value
                for text in value:
                    _check_list_text(key, text)
                value = value[0] if len(value) == 1 else [
                    item for text in value for item in split_list_text(text)]
            overrides[key] = value
        try:
            config = load_config(config_cls, config_path, overrides, trl_flags)
        except UnknownFlags as error:  # click's own refusal, with the closest flags
            raise click.NoSuchOption(
                f"--{error.flags[0].replace('_', '-')}", ctx=click.get_current_context(),
                possibilities=[f"--{n.replace('_', '-')}" for n in error.close]) from None
        run(config)

    return click.Command(name, callback=callback, params=_params(config_cls), help=summary,
                         context_settings={"max_content_width": 100,
                                           "ignore_unknown_options": trl_names,
                                           "allow_extra_args": trl_names})
