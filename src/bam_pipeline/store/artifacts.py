"""Stage artifacts: manifest.json, checksums, atomic publish, model weights.

A stage's output is a directory (``RunLayout.artifact(stage, name)``, or ``RunLayout.data``). It
appears only once complete: it is written into a sibling temporary directory and renamed into
place. Its ``manifest.json`` records what made it and the checksum of every file; downstream stages
find their inputs through manifests and verify the checksums before use.

An artifact's hash is its identity for everything downstream (freshness, caches): the checksums of
its content files and the hashes of its inputs. Record files (``train_log.jsonl``, whose rows hold
wall-clock figures) are checksummed but left out of it, so retraining to identical weights leaves
every downstream stage up to date. Opening an artifact for a run checks that it was made with the
run's tokenizer (:func:`read_artifact`), so every consumer refuses a mismatch the same way.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import platform
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from bam_pipeline.errors import BamError
from bam_pipeline.store.files import canonical_hash, checksums, read_jsonl, verify_checksums
from bam_pipeline.store.layout import MODEL_STAGES, RunLayout, label, stage_args

if TYPE_CHECKING:
    import torch

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.json"
TRAIN_LOG = "train_log.jsonl"
RECORDS = (TRAIN_LOG,)  # checksummed, but not part of the artifact's hash
REQUIRED_FIELDS = ("stage", "name", "hash", "files")
# an expert-choice router's eval thresholds are NaN until training estimates them (docs/architecture.md):
# there NaN means "not estimated yet", not a failure
UNSET_WHEN_NAN = "router.threshold"


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
                         fix=f"delete {self.path} and re-run its stage", exclude=(MANIFEST,))


def read_artifact(path: Path, *, tokenizer: str | None = None) -> Artifact:
    """Read a finished artifact's manifest; BamError when absent, unreadable, or (``tokenizer`` given)
    made with another tokenizer than the run's prepared data."""
    mpath = Path(path) / MANIFEST
    if not mpath.is_file():
        raise BamError(f"no finished artifact in {path} (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BamError(f"corrupt {mpath} ({e}); delete {path} and re-run its stage") from None
    for key in REQUIRED_FIELDS:
        if not isinstance(manifest, dict) or key not in manifest:
            raise BamError(f"corrupt {mpath}: no '{key}' field; delete {path} and re-run its stage")
    art = Artifact(Path(path), manifest)
    if tokenizer is not None and manifest.get("tokenizer_hash") != tokenizer:
        made_with = str(manifest.get("tokenizer_hash") or "none recorded")[:12]
        raise BamError(f"{art.label} was made with another tokenizer ({made_with}) than the run's prepared data "
                       f"({tokenizer[:12]}); re-run its stage so the whole run shares one tokenizer")
    return art


def artifact_containing(path: Path) -> Path | None:
    """The published artifact or prepared data (a directory with a manifest) that ``path`` lies in, if any: a
    file written there would break its checksums."""
    path = Path(path).expanduser().absolute()
    return next((p for p in path.parents if (p / MANIFEST).is_file()), None)


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


def input_label(key: str, record: dict[str, Any]) -> str:
    """The label of a manifest's input: ``data``, ``seed``, ``branch/<d>`` by key; the moe stage's
    ``mix`` input by the last two parts of its recorded path (``.../mix/<variant>``)."""
    if key in ("data", "seed") or "/" in key:
        return key
    path = Path(str(record.get("path", "")))
    return label(path.parent.name, path.name)


def outdated_models(layout: RunLayout, data_hash: str, found: list[Artifact] | None = None) -> dict[str, str]:
    """Label -> why, for every model artifact of the run built from inputs that are not the run's any more:
    prepared data other than ``data_hash``, or an input artifact rebuilt since (another hash), or an
    input that is outdated itself. Its own settings may differ from any command's (a shorter budget for
    one variant): that is a choice its manifest records, not an outdated input. An input deleted since
    tells nothing and is passed over. ``found``: the run's model artifacts when the caller has read them."""
    arts = {a.label: a for a in (find_model_artifacts(layout) if found is None else found)}
    memo: dict[str, str | None] = {}

    def why(lab: str) -> str | None:
        if lab not in memo:
            memo[lab] = None  # a cycle (impossible in a run) stops here
            reasons = []
            for key, record in arts[lab].manifest.get("inputs", {}).items():
                if not isinstance(record, dict):
                    continue  # not a manifest this package wrote
                src = input_label(key, record)
                if src == "data":
                    if record.get("hash") != data_hash:
                        reasons.append("built on other prepared data than the run's")
                elif src in arts and arts[src].hash != record.get("hash"):
                    reasons.append(f"{src} was rebuilt since")
                elif src in arts and why(src) is not None:
                    reasons.append(f"{src} is outdated")
            memo[lab] = "; ".join(reasons) or None
        return memo[lab]

    return {lab: w for lab in arts if (w := why(lab)) is not None}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def remove_dead_temporaries(final_dir: Path) -> list[Path]:
    """Remove the ``<name>.tmp-<pid>`` / ``<name>.old-<pid>`` siblings of ``final_dir`` that a killed
    process left behind (its pid no longer runs here); returns what was removed."""
    final_dir = Path(final_dir)
    removed = []
    for kind in ("tmp", "old"):
        for p in final_dir.parent.glob(f"{final_dir.name}.{kind}-*"):
            pid = p.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # linux/fcntl.h, linux/fs.h


def exchange(a: Path, b: Path) -> bool:
    """Swap the two existing paths ``a`` and ``b`` atomically (Linux ``renameat2(RENAME_EXCHANGE)``, glibc 2.28+);
    False where the OS, libc or filesystem cannot, and nothing was changed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):  # not supported here
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextmanager
def publish(final_dir: Path) -> Iterator[Path]:
    """Write a stage's output atomically.

    Yields a temporary sibling directory; on normal exit it replaces ``final_dir`` by rename, on
    an exception it is removed, so a half-written artifact never exists under the final name.
    An existing output is swapped with the new one in one step (:func:`exchange`), so a concurrent
    reader finds the old output or the new one, never none (an export overwritten while a server
    loads it). Temporaries of killed earlier attempts are removed first.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    for p in remove_dead_temporaries(final_dir):
        print(f"removed {p}, left by a run that was killed while publishing")
    tmp = final_dir.parent / f"{final_dir.name}.tmp-{os.getpid()}"
    old = final_dir.parent / f"{final_dir.name}.old-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:  # from the temporary's first moment: a stop signal may land anywhere, even between two statements
        tmp.mkdir()
        yield tmp
        if final_dir.exists() and exchange(tmp, final_dir):
            shutil.rmtree(tmp, ignore_errors=True)  # now the previous output: a reader never found none
            return
        if final_dir.exists():  # where the OS or filesystem cannot swap: a moment without the output
            final_dir.rename(old)
        tmp.rename(final_dir)
    except BaseException:
        if old.exists() and not final_dir.exists():
            old.rename(final_dir)  # stopped between the two renames: the previous output stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_manifest(out_dir: Path, *, stage: str, name: str, config: dict[str, Any],
                   inputs: dict[str, Artifact] | None = None, **fields: Any) -> dict[str, Any]:
    """Checksum every file in ``out_dir`` and write its manifest.json; returns the manifest.

    ``config`` is what the stage's result depends on (its hash is the stage's identity); ``inputs``
    the upstream artifacts it was made from; ``fields`` anything else worth recording. The
    artifact's hash covers its content files (not :data:`RECORDS`) and its inputs' hashes.
    """
    files = checksums(out_dir, exclude=(MANIFEST,))
    inputs = inputs or {}
    content = {"files": {f: d for f, d in files.items() if f not in RECORDS},
               "inputs": {key: a.hash for key, a in inputs.items()}}
    manifest = {
        "stage": stage,
        "name": name,
        "config": config,
        "config_hash": canonical_hash(config),
        "inputs": {key: {"path": str(a.path), "hash": a.hash} for key, a in inputs.items()},
        "files": files,
        "hash": canonical_hash(content),
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


def nonfinite_values(state: dict) -> dict[str, int]:
    """Name -> how many of its values are NaN or infinite, for every floating tensor of a model state dict
    that holds any, in the state's order (NaN in an expert-choice router's thresholds, :data:`UNSET_WHEN_NAN`,
    does not count; infinity there does). A finite tensor costs one pass that allocates nothing (its least
    and greatest value: NaN propagates into both), ~30x faster than ``isfinite(t).all()`` on the CPU; the
    count only for a failure."""
    import torch

    bad = {}
    for name, t in state.items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        lo, hi = torch.aminmax(t)
        if math.isfinite(lo) and math.isfinite(hi):
            continue
        n = int(torch.isinf(t).sum()) if name.endswith(UNSET_WHEN_NAN) else int((~torch.isfinite(t)).sum())
        if n:
            bad[name] = n
    return bad


def describe_nonfinite(bad: dict[str, int]) -> str:
    """``bad`` (:func:`nonfinite_values`) in words: how many values, in how many tensors, which first."""
    tensors = f"{len(bad)} tensor" + ("s" if len(bad) > 1 else "")
    return f"{sum(bad.values()):,} non-finite values in {tensors} (first {next(iter(bad))})"


def nonfinite_fix(art: Artifact) -> str:
    """How to replace a model artifact whose weights are not finite: import another checkpoint, train it
    again with a lower learning rate, or rebuild it (a mixture or a copy: from its inputs)."""
    source = art.manifest.get("source")
    if isinstance(source, dict):
        return (f"it was imported from {source.get('given') or source.get('path')}, whose weights are not finite: "
                f"import another checkpoint (`{stage_args(art.label)}`)")
    lr = ((art.manifest.get("config") or {}).get("optim") or {}).get("lr")
    if isinstance(lr, (int, float)):
        return (f"delete {art.path} and train it again with a lower train.lr (`{stage_args(art.label)}`; it was "
                f"trained at a peak learning rate of {lr:g})")
    return f"delete {art.path} and rebuild it (`{stage_args(art.label)}`) from finite inputs"


def load_state(art: Artifact, *, verify: bool = True):
    """(ModelConfig, state_dict) of a model artifact, checksums verified first; a BamError naming the
    artifact when a weight is not finite (:func:`nonfinite_values`), so nothing evaluates, samples,
    exports or trains on it."""
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
    bad = nonfinite_values(state)
    if bad:
        raise BamError(f"{art.label} ({art.path}) has weights that are not finite: {describe_nonfinite(bad)}; it "
                       f"cannot be used; {nonfinite_fix(art)}")
    return cfg, state


def load_model(art: Artifact, *, verify: bool = True, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None):
    """A ready model (eval mode) on ``device`` and its config from a model artifact: the one model
    loader (``bam_pipeline.load`` adds the run's tokenizer to it). ``dtype``: cast the floating-point
    parameters to it (default: float32, as built; buffers such as the hash table keep theirs)."""
    from bam_pipeline.model.transformer import BAMTransformer

    cfg, state = load_state(art, verify=verify)
    model = BAMTransformer(cfg)
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype).eval(), cfg


def read_train_log(art: Artifact) -> list[dict[str, Any]]:
    """The rows of an artifact's train_log.jsonl (empty for untrained artifacts)."""
    return read_jsonl(art.path / TRAIN_LOG)
