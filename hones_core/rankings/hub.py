"""Rankings artifacts on the Hub: `load` (a local folder or a Hub dataset repo) and `push`.

`load` downloads through the Hub cache (`snapshot_download`), so `HF_HUB_OFFLINE=1` works once
a repo was downloaded; every way the download can fail (gated, missing repo or revision,
offline and not cached, unreachable, connection lost) becomes a `RankingsNotFoundError` that
says what to do, with `source` and `revision` set.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from ..errors import RankingsNotFoundError
from ..tasks import TASKS
from .schema import Rankings
from .store import existing_dir, read_dir

# --------------------------------------------------------------------------- download


def _looks_like_repo_id(source: str) -> bool:
    if source.startswith((".", "/", "~")) or source.count("/") != 1 or (os.sep != "/" and os.sep in source):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of whichever HTTP client huggingface_hub uses (httpx2 in 2.x, httpx in 1.x)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        errors.append(module.TransportError)
    return tuple(errors)


def _download(repo_id: str, *, revision: str | None, cache_dir: str | Path | None, token: str | bool | None) -> Path:
    from huggingface_hub import constants, errors, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    incomplete = getattr(errors, "IncompleteSnapshotError", None)   # huggingface_hub >= 2

    at = f"{repo_id}@{revision}" if revision else repo_id
    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", revision=revision, cache_dir=cache_dir,
                                      token=token))
    except GatedRepoError as e:
        raise RankingsNotFoundError(
            f"the Hub dataset repo {repo_id} is gated: accept its conditions on the Hub and set HF_TOKEN "
            f"(or pass token=)", source=repo_id, revision=revision) from e
    except RepositoryNotFoundError as e:
        raise RankingsNotFoundError(
            f"no Hub dataset repo {repo_id} (and no local folder of that name): check the id, and for a private "
            f"repo set HF_TOKEN (or pass token=) with read access", source=repo_id, revision=revision) from e
    except RevisionNotFoundError as e:
        raise RankingsNotFoundError(
            f"the Hub dataset repo {repo_id} has no revision {revision!r}: check the branch, tag or commit sha",
            source=repo_id, revision=revision) from e
    except LocalEntryNotFoundError as e:
        if incomplete is not None and isinstance(e, incomplete):
            raise RankingsNotFoundError(
                f"the cached copy of {at} is incomplete and the Hub cannot be reached to complete it: download "
                f"it again online (unset HF_HUB_OFFLINE)", source=repo_id, revision=revision) from e
        first_line = (str(e.__cause__).splitlines() or [""])[0]
        cause = f" ({type(e.__cause__).__name__}: {first_line})" if e.__cause__ is not None else ""
        if constants.is_offline_mode():
            raise RankingsNotFoundError(
                f"{at} is no local folder, and not in the Hub cache while offline mode is on (HF_HUB_OFFLINE=1): "
                f"download it once online, or unset HF_HUB_OFFLINE", source=repo_id, revision=revision) from e
        raise RankingsNotFoundError(
            f"{at} is no local folder, and could not reach the Hub at {constants.ENDPOINT} to download it, nor "
            f"find it in the cache{cause}: "
            f"check the connection (or HF_ENDPOINT); with HF_HUB_OFFLINE=1 a cached copy is used",
            source=repo_id, revision=revision) from e
    except transport_errors() as e:
        raise RankingsNotFoundError(
            f"lost the connection to the Hub at {constants.ENDPOINT} while downloading {at}: {e} — retry, or "
            f"use a cached copy with HF_HUB_OFFLINE=1", source=repo_id, revision=revision) from e


def load(source: str | Path, *, revision: str | None = None, cache_dir: str | Path | None = None,
         token: str | bool | None = None) -> Rankings:
    """Read an artifact from a local folder or a Hub dataset repo, and validate it.

    Args:
        source: an existing folder, or a Hub dataset repo id "org/name".
        revision: branch, tag or commit sha (Hub only).
        cache_dir: Hub cache folder (default: the huggingface_hub cache; honours HF_HUB_OFFLINE).
        token: Hub token for private repos (default: HF_TOKEN or the saved login).

    Returns:
        The `Rankings`, every task's tensors checked against the manifest's model shapes.

    Raises:
        RankingsNotFoundError: neither a folder nor a reachable repo / revision.
        RankingsSchemaError: a file is missing or malformed (the message names it).
    """
    path = Path(source).expanduser()
    if path.exists():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub repos; {path} is a local folder")
        rankings = read_dir(existing_dir(path), origin=str(path))
        rankings.source = {"id": str(path.resolve()), "revision": None, "commit": None}
        return rankings
    source = str(source)
    if not _looks_like_repo_id(source):
        raise RankingsNotFoundError(f"no rankings folder at {path}, and {source!r} is not a Hub repo id "
                                    f"('org/name') — check the path", source=str(source), revision=revision)
    snapshot = _download(source, revision=revision, cache_dir=cache_dir, token=token)
    rankings = read_dir(snapshot, origin=f"{source}@{revision}" if revision else source)
    # a Hub snapshot folder is named after the commit it holds
    rankings.source = {"id": source, "revision": revision, "commit": snapshot.name}
    return rankings


# --------------------------------------------------------------------------- upload


def push(path: str | Path, repo_id: str, *, token: str | None = None, private: bool = False,
         revision: str | None = None, commit_message: str = "Upload HONES rankings") -> str:
    """Upload an artifact folder to a Hub dataset repo (created if needed).

    Only the manifest, the card, the manifest's task folders and other non-hidden files
    (figures) are uploaded; task folders the manifest does not list are left out.

    Args:
        path: the artifact folder (validated with `load` first).
        repo_id: "org/name".
        token: write token (default: HF_TOKEN or the saved login).
        private: create the repo private (an existing repo keeps its visibility).
        revision: branch to commit to (created from main if missing); default main.
        commit_message: the commit summary.

    Returns:
        The commit URL (a `huggingface_hub.CommitInfo`, a `str` with `.oid`, the commit sha).

    Raises:
        RankingsNotFoundError, RankingsSchemaError: `path` is not a valid artifact; or the Hub
            cannot be reached.
    """
    from huggingface_hub import HfApi, constants

    directory = Path(path)
    if not directory.is_dir():
        raise RankingsNotFoundError(f"no rankings folder at {directory} — `push` uploads a local artifact folder",
                                    source=repo_id)
    rankings = read_dir(directory, origin=str(directory))
    left_out = [f"{task}/*" for task in TASKS if task not in rankings.tasks]
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if revision is not None and revision != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=revision, repo_type="dataset", exist_ok=True)
        return api.upload_folder(folder_path=str(directory), repo_id=repo_id, repo_type="dataset",
                                 revision=revision, commit_message=commit_message,
                                 ignore_patterns=[".*", "**/.*", *left_out])
    except transport_errors() as e:
        raise RankingsNotFoundError(f"could not reach the Hub at {constants.ENDPOINT} to push {repo_id}: {e} — "
                                    f"check the connection (or HF_ENDPOINT)", source=repo_id) from e


__all__ = ["load", "push", "transport_errors"]
