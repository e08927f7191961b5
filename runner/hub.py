"""Models from Hugging Face Hub repos, kept in the local Hugging Face cache.

``pull`` downloads the files of an MLX model directory from a repo such as
``mlx-community/SmolLM2-135M-Instruct-4bit`` (``mlxd pull REPO``); ``resolve_cached``
finds that snapshot again, without touching the network. Both use the standard cache
(``HF_HOME``, ``HF_HUB_CACHE``) and endpoint (``HF_ENDPOINT``) of ``huggingface_hub``, so
models downloaded by other tools are found too.

Both functions block: call them from a thread (``trio.to_thread.run_sync``) in async code.
"""

from __future__ import annotations

from pathlib import Path

from runner.errors import SourceError

# The files of an MLX model directory: config and weights, tokenizer, chat template. Not code,
# docs or other weight formats.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def resolve_cached(repo: str) -> Path:
    """Return the cached snapshot directory of ``repo`` (its ``main`` revision).

    Raises ``SourceError`` if the repo was not pulled, or only in part.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, IncompleteSnapshotError

    try:
        # The same patterns as ``pull``: the cached file listing of the repo also has files that
        # ``pull`` skips, and snapshot_download reports a snapshot without them as incomplete.
        path = snapshot_download(repo, allow_patterns=ALLOW_PATTERNS, local_files_only=True)
    except HFValidationError as e:
        raise SourceError(f"{repo!r} is not a Hugging Face repo id: {e}") from None
    except IncompleteSnapshotError:
        raise SourceError(
            f"the download of {repo} in the Hugging Face cache ({_cache_dir()}) is incomplete; "
            f"run `mlxd pull {repo}`"
        ) from None
    except FileNotFoundError:  # LocalEntryNotFoundError: nothing cached for this repo
        raise SourceError(
            f"{repo} is not in the Hugging Face cache ({_cache_dir()}); "
            f"run `mlxd pull {repo}` first"
        ) from None
    return _checked(repo, Path(path))


def pull(repo: str, revision: str | None = None) -> Path:
    """Download ``repo`` (at ``revision``, by default ``main``) into the Hugging Face cache.

    Shows progress bars on stderr, reuses files already cached, and returns the snapshot
    directory. Raises ``SourceError`` when the repo cannot be downloaded.
    """
    import httpx2
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo}@{revision}" if revision else repo
    try:
        path = snapshot_download(repo, revision=revision, allow_patterns=ALLOW_PATTERNS)
    except HFValidationError as e:
        raise SourceError(f"{repo!r} is not a Hugging Face repo id: {e}") from None
    except GatedRepoError:
        raise SourceError(
            f"{repo} is a gated repo: accept its terms on the Hub, then log in (`hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise SourceError(
            f"repo {repo} not found on {constants.ENDPOINT} "
            "(if it is private, log in with `hf auth login` first)"
        ) from None
    except RevisionNotFoundError:
        raise SourceError(f"revision {revision or 'main'} not found in repo {repo}") from None
    except LocalEntryNotFoundError as e:  # snapshot_download's way to say it could not connect
        cause = e.__cause__ or e  # the connection error, or offline mode (HF_HUB_OFFLINE)
        raise SourceError(
            f"could not reach {constants.ENDPOINT} to download {where}: "
            f"{type(cause).__name__}: {_first_line(cause)}"
        ) from e
    except HfHubHTTPError as e:
        raise SourceError(f"downloading {where} failed: {_first_line(e)}") from e
    except (httpx2.HTTPError, OSError) as e:  # network errors mid-download, disk full, ...
        raise SourceError(f"downloading {where} failed: {type(e).__name__}: {e}") from e
    return _checked(repo, Path(path))


def _checked(repo: str, path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise SourceError(f"{repo} is not an MLX model (no config.json in {path})")
    return path


def _cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
