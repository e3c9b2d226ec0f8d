"""Models and data named as on the Hugging Face Hub (``Org/Name``), found in the local cache.

``model: Qwen/Qwen2-0.5B`` or ``data: Org/prefs`` (a TRL user's spelling) names the snapshot that
``hf download`` (or ``from_pretrained``, ``load_dataset``) left in the hub cache: ``HF_HUB_CACHE``,
else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``, read when called. ``Org/Name@revision``
pins a branch, tag or full commit hash the cache knows; the default is ``main``. Nothing is
downloaded: ``huggingface_hub.snapshot_download(local_files_only=True)`` reads ``refs/`` and
``snapshots/`` and makes no request.

A path that exists always wins over a name. A name absent from the cache is a one-line
:class:`~dpokit.errors.DpokitError` saying where it looked and how to download it; a string that
is not ``Org/Name`` (``out/final/``, ``model``, ``/abs/path``) is left to the caller's
"not found". Each resolution is logged once, at info, on the caller's logger.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

from dpokit.errors import DpokitError


@dataclass(frozen=True)
class HubName:
    """A repository on the Hub and the revision wanted (``None``: ``main``)."""

    repo_id: str
    """``Org/Name``."""
    revision: str | None = None
    """A branch, tag or full commit hash, from ``Org/Name@revision``."""

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_name(spec: str | Path) -> HubName | None:
    """``Org/Name`` or ``Org/Name@revision`` as a :class:`HubName`; None for anything else (a
    path with more or fewer parts, a name the Hub would refuse)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id, at, revision = str(spec).partition("@")
    if (at and not revision) or repo_id.count("/") != 1:
        return None
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return HubName(repo_id, revision or None)


def hub_cache() -> Path:
    """The hub cache directory, from the environment as it is now (``huggingface_hub.constants``
    holds the values at its import), in the library's order of precedence."""
    # ``os.getenv(key, default)`` as ``huggingface_hub.constants``: a variable set to "" counts
    # as set (an empty HF_HOME is the relative ``hub``, where ``hf download`` writes too)
    env = os.environ
    home = os.path.expandvars(os.path.expanduser(
        env.get("HF_HOME", os.path.join(env.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"))))
    cache = env.get("HF_HUB_CACHE", env.get("HUGGINGFACE_HUB_CACHE", os.path.join(home, "hub")))
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def cached_snapshot(name: HubName, *, repo_type: str = "model") -> Path:
    """The snapshot directory of ``name`` in the hub cache, with no network access; raises
    ``huggingface_hub``'s ``LocalEntryNotFoundError`` when it is not there."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name.repo_id, revision=name.revision, repo_type=repo_type,
                                  cache_dir=hub_cache(), local_files_only=True))


def locate(path: str | Path, *, repo_type: str = "model") -> Path:
    """``path`` when it exists or is no hub name, else its cached snapshot if there is one (no
    log, no error: for digests of what a config names)."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    name = None if Path(path).exists() else parse_name(path)
    if name is None:
        return Path(path)
    try:
        return cached_snapshot(name, repo_type=repo_type)
    except LocalEntryNotFoundError:
        return Path(path)


def resolve(path: str | Path, *, what: str, logger: str, repo_type: str = "model",
            local: str = "directory") -> Path:
    """Where ``path`` is on disk: itself when it exists or is no hub name (the caller says "not
    found"), else the snapshot of the hub name, logged once on ``logger`` (``model NAME → DIR``).

    A hub name missing from the cache is a :class:`DpokitError` naming the cache and the
    ``hf download`` command; ``local`` is what else the user could pass (``"directory"``)."""
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    name = None if Path(path).exists() else parse_name(path)
    if name is None:
        return Path(path)
    command = (f"hf download {name.repo_id}"
               + (f" --revision {name.revision}" if name.revision else "")
               + (f" --repo-type {repo_type}" if repo_type != "model" else ""))
    try:
        directory = cached_snapshot(name, repo_type=repo_type)
    except IncompleteSnapshotError as error:  # an interrupted download: some files missing
        raise DpokitError(f"{what} {name}: its snapshot in the Hugging Face cache is incomplete "
                          f"({str(error).splitlines()[0]}); download it again with "
                          f"`{command}`") from None
    except LocalEntryNotFoundError:
        at = f" at revision {name.revision}" if name.revision else ""
        held = cached_revisions(name.repo_id, repo_type=repo_type)
        held = f", which holds it at {', '.join(held)}" if held else ""
        raise DpokitError(f"{what} {name}: not a local {local} and not in the Hugging Face "
                          f"cache{at} (looked in {hub_cache()}{held}); download it with "
                          f"`{command}` (or pass a local {local})") from None
    problem = _incomplete(directory)
    if problem:
        raise DpokitError(f"{what} {name}: its snapshot in the Hugging Face cache ({directory}) "
                          f"is incomplete: {problem}; download it again with `{command}`")
    _log_once(logger, repo_type, str(name), str(directory))
    return directory


def _shown(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", …" if len(names) > 3 else "")


def _incomplete(snapshot: Path) -> str | None:
    """What shows that a cached snapshot lacks files, or None.

    ``huggingface_hub`` checks a snapshot against its tree listing only when ``hf download``
    cached one (``trees/<commit>.json``); ``from_pretrained`` and ``hf_hub_download`` leave
    none, and a download they did not finish leaves only the files it got. So, besides the
    listing's check: links to blobs that are gone, a weights index (``*.index.json``) naming
    shards that are not there, a shard set ``name-00001-of-00004`` with members missing (a
    dataset's Parquet shards: a silently smaller data set), and — when there is no listing —
    an unfinished ``blobs/*.incomplete`` of the repository (a download killed mid-file)."""
    try:
        files = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*")
                       if p.is_file() or p.is_symlink())
        present = {f for f in files if (snapshot / f).is_file()}
        broken = [f for f in files if f not in present]
        if broken:  # the blobs these point to were removed
            return (f"{len(broken)} of its files link to blobs that are not there "
                    f"({_shown(broken)})")
        missing = _missing_shards(snapshot, present)
        if missing:
            return f"{len(missing)} shard{'s' * (len(missing) > 1)} missing ({_shown(missing)})"
        repo = snapshot.parent.parent
        if not (repo / "trees" / f"{snapshot.name}.json").is_file():
            unfinished = sorted(p.name for p in (repo / "blobs").glob("*.incomplete"))
            if unfinished:
                return (f"a download into it did not finish ({_shown(unfinished)} in "
                        f"{repo / 'blobs'}), so files of it may be missing")
    except OSError as error:
        return f"it cannot be read ({error.strerror or error})"
    return None


_SHARD = re.compile(r"^(?P<stem>.*)-(?P<index>\d{5})-of-(?P<total>\d{5})(?P<suffix>\.[^/]*)?$")


_ONE_BASED = ("safetensors", "bin", "pt", "pth", "gguf", "h5", "msgpack")
"""Weight files, which transformers (and llama.cpp) number from 1; a dataset's from 0."""


def _missing_shards(snapshot: Path, present: set[str]) -> list[str]:
    """The files of ``snapshot`` a weights index names that are not there, and the members of
    a ``stem-NNNNN-of-MMMMM.suffix`` shard set that are not there (numbered from 0 as the Hub's
    datasets, or from 1 as transformers' weights)."""
    missing: set[str] = set()
    for index in (f for f in present if f.endswith(".index.json")):
        try:
            weight_map = json.loads((snapshot / index).read_text(encoding="utf-8")).get(
                "weight_map")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            continue  # not a weights index: the loader says what is wrong with it
        if isinstance(weight_map, dict):
            folder = posixpath.dirname(index)
            missing.update(posixpath.join(folder, shard) for shard in weight_map.values()
                           if isinstance(shard, str)
                           and posixpath.join(folder, shard) not in present)
    sets: dict[tuple[str, str, int], set[int]] = {}
    for file in present:
        match = _SHARD.match(file)
        if match and int(match["total"]) > 0:
            key = (match["stem"], match["suffix"] or "", int(match["total"]))
            sets.setdefault(key, set()).add(int(match["index"]))
    for (stem, suffix, total), indices in sets.items():
        # numbered from 0 or from 1: what the set holds says, else the convention of its kind
        first = (0 if 0 in indices else 1 if total in indices
                 else int(suffix.split(".")[-1] in _ONE_BASED))
        missing.update(f"{stem}-{i:05d}-of-{total:05d}{suffix}"
                       for i in range(first, first + total) if i not in indices)
    return sorted(missing)


def cached_revisions(repo_id: str, *, repo_type: str = "model") -> list[str]:
    """The revisions of ``repo_id`` the hub cache holds, as ``commit (refs)``, for messages;
    ``huggingface_hub.scan_cache_dir`` reads the layout."""
    from huggingface_hub import CacheNotFound, scan_cache_dir

    try:
        repos = scan_cache_dir(hub_cache()).repos
    except (CacheNotFound, ValueError, OSError):  # none, or a file where the cache should be
        return []
    return sorted(f"{r.commit_hash}" + (f" ({', '.join(sorted(r.refs))})" if r.refs else "")
                  for repo in repos if (repo.repo_id, repo.repo_type) == (repo_id, repo_type)
                  for r in repo.revisions)


@functools.cache
def _log_once(logger: str, repo_type: str, name: str, directory: str) -> None:
    """One info line per name and snapshot, ``model Org/Name → DIR`` (a run resolves its model
    several times: positions, tokenizer, reference, policy)."""
    logging.getLogger(logger).info("%s %s → %s", repo_type, name, directory)
