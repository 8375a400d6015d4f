"""``bam_pipeline.load``: any stage artifact (seed, branch, mix, moe) as a ready model, with the
tokenizer it was made with."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bam_pipeline.data.prepare import TOKENIZER_FILE, open_prepared
from bam_pipeline.data.tokenizer import as_run_tokenizer, tokenizer_hash
from bam_pipeline.errors import BamError
from bam_pipeline.interop import hf_tokenizer
from bam_pipeline.model.config import ModelConfig
from bam_pipeline.model.transformer import BAMTransformer
from bam_pipeline.store.artifacts import Artifact, load_state, read_artifact
from bam_pipeline.store.layout import RunLayout


class LoadedModel(nn.Module):
    """A stage artifact's model in eval mode: ``model(input_ids (B, T))`` returns logits ``(B, T, V)``.

    ``tokenizer`` is the run's (a ``tokenizers.Tokenizer``); ``encode(text)`` gives ``(1, T)`` ids.
    """

    def __init__(self, model: BAMTransformer, tokenizer, artifact: Artifact) -> None:
        super().__init__()
        self.model, self.tokenizer, self.artifact = model, tokenizer, artifact

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids).logits  # (B, T, V)

    def encode(self, text: str) -> torch.Tensor:
        """``text`` as one document's ids ``(1, T)`` (no end-of-document token appended)."""
        device = next(self.model.parameters()).device
        return torch.tensor([self.tokenizer.encode(text).ids], dtype=torch.long, device=device)


def _tokenizer(art: Artifact):
    """The tokenizer of the run ``art`` belongs to: its prepared data's, checked against the artifact's."""
    from tokenizers import Tokenizer

    layout = RunLayout(art.path.parent.parent)
    source = (art.manifest.get("source") or {}).get("path")
    if not (layout.data / TOKENIZER_FILE).is_file() and source:  # an import, before any data was prepared
        tok = as_run_tokenizer(hf_tokenizer.load_tokenizer(Path(source))[0])
        if tokenizer_hash(tok) == art.manifest.get("tokenizer_hash"):
            return tok
    if not (layout.data / TOKENIZER_FILE).is_file():
        raise BamError(f"no tokenizer for {art.path}: the run's prepared data ({layout.data}) is missing; run "
                       "`python -m bam_pipeline stage=data` with the run's settings")
    prepared = open_prepared(layout.data, verify=False)
    if prepared.tokenizer_hash != art.manifest.get("tokenizer_hash"):
        raise BamError(f"{art.label} was made with another tokenizer than the run's prepared data ({layout.data}); "
                       "re-run its stage")
    return Tokenizer.from_file(str(layout.data / TOKENIZER_FILE))


def load(artifact_dir: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         verify: bool = True) -> LoadedModel:
    """The model of the stage artifact at ``artifact_dir`` (e.g. ``stages/tiny/moe/bam``), in eval mode on
    ``device`` in ``dtype``, checksums verified first; a BamError in one line when it cannot."""
    art = read_artifact(Path(artifact_dir))
    cfg, state = load_state(art, verify=verify)
    model = BAMTransformer(cfg)
    model.load_state_dict(state, strict=True)
    return LoadedModel(model.to(device=device, dtype=dtype).eval(), _tokenizer(art), art)
