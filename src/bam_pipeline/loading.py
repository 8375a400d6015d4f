"""``bam_pipeline.load``: any stage artifact (seed, branch, mix, moe) as a ready model, with the
tokenizer it was made with. The model is :func:`bam_pipeline.store.artifacts.load_model`'s, the one
loader every stage uses; this public entry adds the run's tokenizer and text generation."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bam_pipeline.data.prepare import TOKENIZER_FILE, open_prepared
from bam_pipeline.data.tokenizer import as_run_tokenizer, tokenizer_hash
from bam_pipeline.errors import BamError
from bam_pipeline.interop import hf_tokenizer
from bam_pipeline.model.config import ModelConfig
from bam_pipeline.model.generation import Sampling, TextGeneration, generate_text
from bam_pipeline.model.transformer import BAMTransformer
from bam_pipeline.store.artifacts import Artifact, load_model, read_artifact
from bam_pipeline.store.layout import RunLayout


class LoadedModel(nn.Module):
    """A stage artifact's model in eval mode: ``model(input_ids (B, T))`` returns logits ``(B, T, V)``.

    ``tokenizer`` is the run's (a ``tokenizers.Tokenizer``); ``encode(text)`` gives ``(1, T)`` ids;
    ``generate(text)`` continues a text with the KV cache (what ``stage=generate`` prints);
    ``eos_id`` is the run's end-of-document token.
    """

    def __init__(self, model: BAMTransformer, tokenizer, artifact: Artifact, eos_id: int | None = None) -> None:
        super().__init__()
        self.model, self.tokenizer, self.artifact, self.eos_id = model, tokenizer, artifact, eos_id

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids).logits  # (B, T, V)

    def encode(self, text: str) -> torch.Tensor:
        """``text`` as one document's ids ``(1, T)`` (no end-of-document token appended)."""
        device = next(self.model.parameters()).device
        return torch.tensor([self.tokenizer.encode(text).ids], dtype=torch.long, device=device)

    def generate(self, text: str | list[str], *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True, batch_size: int = 8
                 ) -> str | list[str]:
        """The continuation of ``text`` (a list: of each), decoded with the KV cache: greedy at
        ``temperature=0``, else sampled (nucleus ``top_p``) from a generator seeded with ``seed``;
        up to ``max_new_tokens``, stopping at the end of the document unless ``stop_at_eos=False``.
        The same decoding as ``stage=generate``; :meth:`generate_full` also gives the token ids."""
        results = self.generate_full([text] if isinstance(text, str) else list(text), max_new_tokens=max_new_tokens,
                                     temperature=temperature, top_p=top_p, seed=seed, stop_at_eos=stop_at_eos,
                                     batch_size=batch_size)
        texts = [r.text for r in results]
        return texts[0] if isinstance(text, str) else texts

    def generate_full(self, prompts: list[str], *, max_new_tokens: int = 64, temperature: float = 0.0,
                      top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True, batch_size: int = 8
                      ) -> list[TextGeneration]:
        """Like :meth:`generate`, each prompt's ids, new ids and text (``TextGeneration``)."""
        results, _ = generate_text(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens,
                                   sampling=Sampling(temperature, top_p), eos_id=self.eos_id if stop_at_eos else None,
                                   seed=seed, batch_size=batch_size)
        return results


def _tokenizer(art: Artifact):
    """The tokenizer of the run ``art`` belongs to and its end-of-document id: its prepared data's,
    checked against the artifact's."""
    from tokenizers import Tokenizer

    layout = RunLayout(art.path.parent.parent)
    source = (art.manifest.get("source") or {}).get("path")
    if not (layout.data / TOKENIZER_FILE).is_file() and source:  # an import, before any data was prepared
        tok = as_run_tokenizer(hf_tokenizer.load_tokenizer(Path(source))[0])
        if tokenizer_hash(tok) == art.manifest.get("tokenizer_hash"):
            eos = (art.manifest.get("end_of_document") or {}).get("id")  # the seed's seed.eos_token, where set
            return tok, eos if eos is not None else hf_tokenizer.end_of_document_id(Path(source))[0]
    if not (layout.data / TOKENIZER_FILE).is_file():
        raise BamError(f"no tokenizer for {art.path}: the run's prepared data ({layout.data}) is missing; run "
                       "`python -m bam_pipeline stage=data` with the run's settings")
    prepared = open_prepared(layout.data, verify=False)
    if prepared.tokenizer_hash != art.manifest.get("tokenizer_hash"):
        raise BamError(f"{art.label} was made with another tokenizer than the run's prepared data ({layout.data}); "
                       "re-run its stage")
    return Tokenizer.from_file(str(layout.data / TOKENIZER_FILE)), prepared.eos_id


def load(artifact_dir: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         verify: bool = True) -> LoadedModel:
    """The model of the stage artifact at ``artifact_dir`` (e.g. ``stages/tiny/moe/bam``), in eval mode on
    ``device`` in ``dtype``, checksums verified first; a BamError in one line when it cannot."""
    art = read_artifact(Path(artifact_dir))
    model, _ = load_model(art, verify=verify, device=device, dtype=dtype)
    tokenizer, eos_id = _tokenizer(art)
    return LoadedModel(model, tokenizer, art, eos_id)
