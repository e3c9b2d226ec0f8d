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
import logging
import os
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
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache",
                                              "huggingface")
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
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
    broken = _dangling_links(directory)
    if broken:  # the blobs these point to were removed, or their download never finished
        shown = ", ".join(broken[:3]) + (", …" if len(broken) > 3 else "")
        raise DpokitError(f"{what} {name}: its snapshot in the Hugging Face cache ({directory}) "
                          f"is incomplete: {len(broken)} of its files "
                          f"link to blobs that are not there ({shown}); download it again "
                          f"with `{command}`")
    _log_once(logger, repo_type, str(name), str(directory))
    return directory


def _dangling_links(snapshot: Path) -> list[str]:
    """The files of a cached snapshot whose symlink leads to no blob, relative to it."""
    try:
        return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*")
                      if p.is_symlink() and not p.exists())
    except OSError:
        return []


def cached_revisions(repo_id: str, *, repo_type: str = "model") -> list[str]:
    """The revisions of ``repo_id`` the hub cache holds, as ``commit (refs)``, for messages;
    ``huggingface_hub.scan_cache_dir`` reads the layout."""
    from huggingface_hub import CacheNotFound, scan_cache_dir

    try:
        repos = scan_cache_dir(hub_cache()).repos
    except CacheNotFound:
        return []
    return sorted(f"{r.commit_hash}" + (f" ({', '.join(sorted(r.refs))})" if r.refs else "")
                  for repo in repos if (repo.repo_id, repo.repo_type) == (repo_id, repo_type)
                  for r in repo.revisions)


@functools.cache
def _log_once(logger: str, repo_type: str, name: str, directory: str) -> None:
    """One info line per name and snapshot, ``model Org/Name → DIR`` (a run resolves its model
    several times: positions, tokenizer, reference, policy)."""
    logging.getLogger(logger).info("%s %s → %s", repo_type, name, directory)
