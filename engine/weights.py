"""Download the released GeoLLaVA-8K checkpoint (``make weights``) and verify it.

Uses huggingface_hub's ``snapshot_download`` into a plain directory, fetching only what the
engine needs (config, safetensors shards + index, tokenizer files). Interrupted downloads resume
on the next call. After the download the directory is checked the same way the loader checks it.

The branch or tag asked for (default ``main``) is resolved to its commit first, and every file
comes from that one commit, recorded in ``REVISION.txt`` in the checkpoint folder: a download
resumed or repaired later (no ``--revision``) fetches the same commit, never a mix of an old and
a re-uploaded checkpoint, and the folder says which checkpoint it holds.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_REPO = "initiacms/GeoLLaVA-8K"
REPO_ROOT = Path(__file__).resolve().parents[1]
# where `make weights` puts the checkpoint and the engine looks for it: one absolute path for both,
# so a download started from another folder lands where ask / serve / eval read it
DEFAULT_WEIGHTS = REPO_ROOT / "weights" / "GeoLLaVA-8K"
ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "*.md",
]
# the checkpoint's files are all at the top of the repository; huggingface_hub's patterns are
# fnmatch patterns, whose * also matches "/", so "*.safetensors" alone would fetch the shards of
# any training checkpoint folder (checkpoint-1000/...) the repository holds too
IGNORE_PATTERNS = ["*/*"]


REVISION_FILE = "REVISION.txt"


class DownloadError(RuntimeError):
    """The weights could not be downloaded (message says why and what to do)."""


def demo_model_note(given, doing: str = "using") -> str:
    """The line that says the tiny RANDOM demo model answers (``doing``: "using", "evaluating",
    "training"): the checkpoint ``given`` (--weights) is that demo model, or, with none given,
    no GeoLLaVA-8K weights were found (also when ``given`` is the default folder, which is taken as
    not given when it holds no checkpoint: it is not the demo model itself)."""
    if given and Path(given).expanduser().resolve() == DEFAULT_WEIGHTS.resolve():
        given = None
    if given:
        return (f"NOTE: {given} is the tiny RANDOM demo model, not GeoLLaVA-8K; {doing} it (answers are "
                "meaningless). Run `make weights` to download the real checkpoint.")
    return (f"NOTE: no GeoLLaVA-8K weights found; {doing} the tiny RANDOM demo model (answers are "
            "meaningless). Run `make weights` to download the real checkpoint.")

def download_weights(
    dest: str | os.PathLike,
    repo: str = DEFAULT_REPO,
    revision: str | None = None,
    *,
    token: str | None = None,
) -> Path:
    """Download ``repo`` into ``dest`` (resumable) and return the verified directory."""
    from engine.loader import CheckpointError, read_config_json, weight_files
    from engine.memory_check import UnreadableWeights, count_parameters

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise DownloadError("huggingface_hub is not installed; run `make setup`") from exc
    commit = resolve_revision(repo, revision, dest, token)
    try:
        snapshot_download(
            repo_id=repo,
            revision=commit or revision,
            local_dir=str(dest),
            allow_patterns=ALLOW_PATTERNS,
            ignore_patterns=IGNORE_PATTERNS,
            token=token,
        )
    except LocalEntryNotFoundError as exc:
        raise DownloadError(
            f"cannot reach the Hugging Face Hub to download {repo}: this machine seems to be "
            f"offline. Copy the checkpoint into {dest} by other means, or retry when online."
        ) from exc
    except HfHubHTTPError as exc:
        raise DownloadError(f"the Hugging Face Hub refused the download of {repo}: {exc}") from exc
    except OSError as exc:
        raise DownloadError(f"downloading {repo} into {dest} failed: {exc}") from exc
    try:
        read_config_json(dest)
        files = weight_files(dest)
        count_parameters(files)  # every shard's header reads and its data is all there
    except (CheckpointError, UnreadableWeights) as exc:
        raise DownloadError(f"the download finished but the checkpoint is not usable: {exc}") from exc
    if not files:
        raise DownloadError(f"no weight files were downloaded into {dest}")
    if commit:
        (dest / REVISION_FILE).write_text(f"{repo}\n{commit}\n", encoding="utf-8")
    return dest


def recorded_revision(dest: str | os.PathLike, repo: str = DEFAULT_REPO) -> str | None:
    """The commit of ``repo`` an earlier download into ``dest`` fetched (its REVISION.txt), or None."""
    try:
        lines = (Path(dest) / REVISION_FILE).read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError):
        return None
    if len(lines) == 2 and lines[0] == repo and len(lines[1]) == 40 and all(c in "0123456789abcdef" for c in lines[1]):
        return lines[1]
    return None


def resolve_revision(repo: str, revision: str | None, dest: str | os.PathLike, token: str | None) -> str | None:
    """The commit to download: with no ``revision``, the one an earlier download into ``dest``
    recorded; else the Hub's commit for ``revision`` (default main). None when the Hub cannot be
    asked (offline: the download then says so)."""
    if revision is None:
        recorded = recorded_revision(dest, repo)
        if recorded:
            return recorded
    try:
        from huggingface_hub import HfApi

        sha = HfApi().model_info(repo, revision=revision, token=token).sha
    except Exception:  # noqa: BLE001 - offline, refused, unknown revision: snapshot_download says which
        return None
    return sha if isinstance(sha, str) and sha else None
