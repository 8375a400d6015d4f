"""Stage artifacts: manifest.json, checksums, atomic publish, model weights.

A stage's output is a directory (``RunLayout.artifact(stage, name)``, or ``RunLayout.data``). It
appears only once complete: it is written into a sibling temporary directory and renamed into
place. Its ``manifest.json`` records what made it and the checksum of every file; downstream stages
find their inputs through manifests and verify the checksums before use.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from bam_pipeline.errors import BamError
from bam_pipeline.store.files import canonical_hash, checksums, read_jsonl, verify_checksums
from bam_pipeline.store.layout import MODEL_STAGES, RunLayout, label

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.json"
TRAIN_LOG = "train_log.jsonl"
REQUIRED_FIELDS = ("stage", "name", "hash", "files")


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("bam-pipeline", "torch", "lightning", "hydra-core", "datasets", "tokenizers", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


@dataclass(frozen=True)
class Artifact:
    """A finished stage output and its manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def hash(self) -> str:
        return self.manifest["hash"]

    @property
    def label(self) -> str:
        return label(self.stage, self.name)

    def verify(self) -> None:
        """Check every file's checksum against the manifest; BamError naming the first bad file."""
        verify_checksums(self.path, self.manifest.get("files", {}), what=f"artifact {self.label}",
                         fix=f"delete {self.path} and re-run its stage")


def read_artifact(path: Path) -> Artifact:
    """Read a finished artifact's manifest; BamError when absent or unreadable."""
    mpath = Path(path) / MANIFEST
    if not mpath.is_file():
        raise BamError(f"no finished artifact in {path} (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BamError(f"corrupt {mpath} ({e}); delete {path} and re-run its stage") from None
    for key in REQUIRED_FIELDS:
        if not isinstance(manifest, dict) or key not in manifest:
            raise BamError(f"corrupt {mpath}: no '{key}' field; delete {path} and re-run its stage")
    return Artifact(Path(path), manifest)


def try_read_artifact(path: Path) -> Artifact | None:
    """The artifact at ``path`` if it is finished and readable, else None."""
    try:
        return read_artifact(path)
    except BamError:
        return None


def find_model_artifacts(layout: RunLayout) -> list[Artifact]:
    """Every finished model artifact of a run, in the order seed, branch/*, mix/*, moe/*."""
    found: list[Artifact] = []
    for stage in MODEL_STAGES:
        for d in layout.stage_dirs(stage):
            art = try_read_artifact(d)
            if art is not None and (d / WEIGHTS).is_file():
                found.append(art)
    return found


@contextmanager
def publish(final_dir: Path) -> Iterator[Path]:
    """Write a stage's output atomically.

    Yields a temporary sibling directory; on normal exit it replaces ``final_dir`` by rename, on
    an exception it is removed, so a half-written artifact never exists under the final name.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = final_dir.parent / f"{final_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final_dir.parent / f"{final_dir.name}.old-{os.getpid()}"
    if final_dir.exists():
        final_dir.rename(old)
    tmp.rename(final_dir)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def write_manifest(out_dir: Path, *, stage: str, name: str, config: dict[str, Any],
                   inputs: dict[str, Artifact] | None = None, **fields: Any) -> dict[str, Any]:
    """Checksum every file in ``out_dir`` and write its manifest.json; returns the manifest.

    ``config`` is what the stage's result depends on (its hash is the stage's identity); ``inputs``
    the upstream artifacts it was made from; ``fields`` anything else worth recording.
    """
    files = checksums(out_dir, exclude=(MANIFEST,))
    manifest = {
        "stage": stage,
        "name": name,
        "config": config,
        "config_hash": canonical_hash(config),
        "inputs": {key: {"path": str(a.path), "hash": a.hash} for key, a in (inputs or {}).items()},
        "files": files,
        "hash": canonical_hash(files),
        "versions": package_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **fields,
    }
    (Path(out_dir) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    return manifest


def save_model(out_dir: Path, model_cfg, state_dict: dict) -> None:
    """Write weights (safetensors) and the model config (JSON) into ``out_dir``."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(Path(out_dir) / WEIGHTS))
    (Path(out_dir) / MODEL_CONFIG).write_text(json.dumps(model_cfg.to_dict(), indent=2) + "\n")


def read_model_config(art: Artifact):
    """The ModelConfig of a model artifact, without its weights."""
    from bam_pipeline.model.config import ModelConfig

    try:
        return ModelConfig.from_dict(json.loads((art.path / MODEL_CONFIG).read_text()))
    except (OSError, ValueError, TypeError, BamError) as e:
        raise BamError(f"cannot read the model config of {art.path} ({e}); delete it and re-run its stage") from None


def load_state(art: Artifact, *, verify: bool = True):
    """(ModelConfig, state_dict) of a model artifact, checksums verified first."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from bam_pipeline.model.config import ModelConfig

    if verify:
        art.verify()
    try:
        cfg = ModelConfig.from_dict(json.loads((art.path / MODEL_CONFIG).read_text()))
        state = load_file(str(art.path / WEIGHTS))
    except (OSError, ValueError, TypeError, json.JSONDecodeError, SafetensorError, BamError) as e:
        raise BamError(f"cannot load model from {art.path} ({e}); delete it and re-run its stage") from None
    return cfg, state


def load_model(art: Artifact, *, verify: bool = True, device: str = "cpu"):
    """A ready model (eval mode) and its config from a model artifact."""
    from bam_pipeline.model.transformer import BAMTransformer

    cfg, state = load_state(art, verify=verify)
    model = BAMTransformer(cfg)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), cfg


def read_train_log(art: Artifact) -> list[dict[str, Any]]:
    """The rows of an artifact's train_log.jsonl (empty for untrained artifacts)."""
    return read_jsonl(art.path / TRAIN_LOG)
