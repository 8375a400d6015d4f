"""A Hugging Face model given as a local directory (or GGUF file) or a hub id (``org/name``), resolved to a
local model directory and, for hub ids, the commit it was downloaded at (for a manifest). Hub ids
download safetensors checkpoints; a GGUF file is given by its local path.

Hub ids download through ``huggingface_hub.snapshot_download`` (only the files an import reads);
under ``HF_HUB_OFFLINE=1`` it serves the local cache. Every failure ends in one line that says
what to do: pass a local directory, log in with a token, check the id or revision.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from bam_pipeline.errors import BamError

# What an import reads: config, weights (single or sharded safetensors), tokenizer files.
DOWNLOAD_PATTERNS = (
    "config.json", "generation_config.json", "model.safetensors", "model-*.safetensors",
    "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json",
)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class HFModelDir:
    """A Hugging Face model directory (or a GGUF file) on this machine. ``repo_id``/``revision`` (the commit)
    are set for hub downloads."""

    path: Path
    repo_id: str | None = None
    revision: str | None = None


def resolve_hf_model_dir(source: str, revision: str | None = None) -> HFModelDir:
    """A local directory or ``.gguf`` file as is; a hub id downloaded (or found in the cache) at ``revision``
    (default: the repository's main branch), returned with the commit it resolved to."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix != ".gguf":
        raise BamError(f"{source} is a file; pass a checkpoint directory, a .gguf file or a hub id (org/name)")
    if path.is_dir() or path.is_file():
        if revision is not None:
            raise BamError(f"revision={revision!r} applies to hub ids, but {source} is a local path; drop it")
        return HFModelDir(path.resolve())
    if source.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(source):
        raise BamError(f"checkpoint directory {source} does not exist; pass a local directory or a hub id (org/name)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise BamError(f"{source} is not a local directory, and downloading hub ids needs huggingface_hub "
                       "(pip install 'bam-pipeline[hf]'); or pass a local directory") from None
    at = f"{source}@{revision}" if revision else source
    try:
        local = Path(snapshot_download(repo_id=source, revision=revision, allow_patterns=list(DOWNLOAD_PATTERNS)))
    except GatedRepoError:
        raise BamError(f"hub model {source} is gated: accept its terms on huggingface.co, then log in with a "
                       "token (hf auth login, or HF_TOKEN=...)") from None
    except RepositoryNotFoundError:
        raise BamError(f"no hub model {source} (or it is private: log in with a token: hf auth login); "
                       "check the id, or pass a local directory") from None
    except RevisionNotFoundError:
        raise BamError(f"hub model {source} has no revision {revision!r}; "
                       "pass a branch, tag or commit it has") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise BamError(f"cannot download {at}: offline (HF_HUB_OFFLINE=1 or no network) and not in the local "
                       f"cache; download it where there is network (hf download {source} --local-dir DIR) and "
                       "pass that directory") from None
    except HfHubHTTPError as e:
        raise BamError(f"downloading {at} failed ({' '.join(str(e).split())[:200]}); retry, or pass a "
                       "local directory") from None
    commit = local.name if _COMMIT.fullmatch(local.name) else revision
    return HFModelDir(local, source, commit)
