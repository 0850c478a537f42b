"""Find a model directory: a local path, or a model id ("gpt2", "org/name") in the local Hugging Face
cache. Offline only: nothing here ever uses the network, and every failure says how to get the files."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any


def file_present(path: Path) -> bool:
    """Whether `path` is a readable file; a symlink into a missing Hugging Face cache blob is an error,
    not "absent", so that an incomplete download is reported as such instead of as some other file."""
    if path.is_file():
        return True
    if path.is_symlink():
        raise FileNotFoundError(
            f"{path} is a link to {os.readlink(path)}, which does not exist: the Hugging Face "
            "cache is incomplete (interrupted download or a deleted blob); download the model "
            "again, or copy a complete model folder and pass its path"
        )
    return False


def hf_cache_dir() -> Path:
    """Where huggingface_hub keeps downloads, by its own rules: $HF_HUB_CACHE (or the older
    $HUGGINGFACE_HUB_CACHE), else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else
    ~/.cache/huggingface/hub."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "huggingface" / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


_ID_PART = re.compile(r"\w(?:[\w.-]{0,94}\w)?")


def is_repo_id(name: str) -> bool:
    """Whether `name` has the shape of a Hub model id ("gpt2", "org/name"), by the Hub's own rules."""
    parts = name.split("/")
    return len(parts) in (1, 2) and all(_ID_PART.fullmatch(p) for p in parts) and "--" not in name and ".." not in name


def _snapshot_names(snapshots: Path) -> list[str]:
    return sorted(p.name for p in snapshots.iterdir() if p.is_dir()) if snapshots.is_dir() else []


def cached_snapshot(repo_id: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """The snapshot folder of a model in the local Hugging Face cache; never touches the network.

    `revision`: a branch or tag recorded under `refs/` (default "main") or a commit hash. With no
    revision and no `refs/main`, the only snapshot is used; several are ambiguous and an error.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else hf_cache_dir()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    get = (
        f"download them where a network exists with `huggingface-cli download {repo_id}` (or "
        f"huggingface_hub.snapshot_download({repo_id!r})) into this cache, or copy the model folder "
        "here and pass its path"
    )
    if not repo.is_dir():
        raise FileNotFoundError(
            f"{repo_id!r} is not a local directory and is not in the Hugging Face cache "
            f"(looked in {repo}; the cache is $HF_HUB_CACHE, else $HF_HOME/hub, else "
            f"~/.cache/huggingface/hub). lmforge never downloads: {get}"
        )
    snapshots = repo / "snapshots"
    names = _snapshot_names(snapshots)
    if not names:
        raise FileNotFoundError(
            f"{repo} is in the Hugging Face cache but holds no snapshot (nothing in "
            f"{snapshots}): the download was interrupted or cleaned up. To get the files, {get}"
        )
    if revision is not None and (not revision or Path(revision).is_absolute() or ".." in Path(revision).parts):
        raise ValueError(f"revision {revision!r} is not a branch, tag or commit name")
    wanted = revision or "main"
    ref = repo / "refs" / wanted
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
        if (snapshots / commit).is_dir():
            return snapshots / commit
        raise FileNotFoundError(
            f"{ref} points at commit {commit!r}, but {snapshots / commit} does not exist "
            f"(snapshots there: {names}): the cache is incomplete. To get the files, {get}"
        )
    if (snapshots / wanted).is_dir():
        return snapshots / wanted
    if revision is None:
        if len(names) == 1:
            return snapshots / names[0]
        raise FileNotFoundError(
            f"{repo} has several snapshots {names} and no refs/main to choose between them; "
            "pass revision=<one of them> (or a branch name recorded under refs/)"
        )
    refs = (
        sorted(str(p.relative_to(repo / "refs")) for p in (repo / "refs").rglob("*") if p.is_file())
        if (repo / "refs").is_dir()
        else []
    )
    raise FileNotFoundError(
        f"revision {revision!r} of {repo_id!r} is not in the Hugging Face cache at {repo} "
        f"(branches/tags under refs/: {refs}; snapshots: {names}). Pass one of those, or "
        f"download it where a network exists with `huggingface-cli download {repo_id} "
        f"--revision {revision}`"
    )


def resolve_model_dir(
    name_or_path: str | os.PathLike, revision: str | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """The folder holding config.json for a local directory or, offline, a model id ("gpt2",
    "org/name") in the local Hugging Face cache. A local path that exists always wins."""
    directory = Path(name_or_path).expanduser()
    if directory.exists():
        if revision is not None:
            raise ValueError(
                f"revision={revision!r} applies to Hugging Face cache ids, but {directory} is a local "
                "path; drop revision= or pass the model id"
            )
    elif is_repo_id(str(name_or_path)):
        directory = cached_snapshot(str(name_or_path), revision, cache_dir)
    else:
        raise FileNotFoundError(
            f"model directory {directory} does not exist; pass the folder written by "
            "save_pretrained or `lmforge pretrain --out`, or a Hugging Face model id "
            '("gpt2", "org/name") that is in the local cache'
        )
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{directory} is a file, not a model directory; pass the folder that holds config.json and the weights"
        )
    if not file_present(directory / "config.json"):
        raise FileNotFoundError(
            f"{directory} has no config.json; it is not a model directory (expected config.json + model.safetensors)"
        )
    return directory


def read_config_dict(directory: str | os.PathLike) -> dict[str, Any]:
    """config.json of a model directory as a plain dict (e.g. to read `model_type` or `architectures`)."""
    path = Path(directory) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
