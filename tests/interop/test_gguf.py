"""GGUF checkpoints: a tiny GGUF written with the gguf package's writer (F32 norms, a Q8_0 embedding, Q4_1
matrices; tests/interop/gguf_files.py) imports into a model that computes what transformers computes from
the same file; its tokenizer is the one transformers builds from the file; its bookkeeping is recorded;
what cannot be imported is one line."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch

pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from gguf_files import EOS_ID, Q, UNK_ID, tiny_llama, write_gguf, zero_blocks  # noqa: E402
from bam_pipeline.errors import BamError, ConfigError  # noqa: E402
from bam_pipeline.interop import import_hf_model, load_hf_model_tokenizer  # noqa: E402
from bam_pipeline.model import BAMTransformer  # noqa: E402

TEXT = "The quick brown fox: def add(a, b) returns x squared. The licensee shall keep this notice."


def _ours(ck) -> BAMTransformer:
    model = BAMTransformer(ck.config).eval()
    model.load_state_dict(ck.state_dict, strict=True)
    return model


def _ids(tok) -> torch.Tensor:
    """(2, 40): real text and random ids over every row."""
    text = (tok.encode(TEXT).ids * 3)[:40]
    rand = torch.randint(0, tok.get_vocab_size(), (40,), generator=torch.Generator().manual_seed(3))
    return torch.stack([torch.tensor(text), rand])


@pytest.mark.parametrize("tied", [True, False])
def test_a_gguf_computes_what_transformers_reads_from_it(tied, tmp_path):
    model, tok = tiny_llama(tie_word_embeddings=tied)
    path = write_gguf(tmp_path / "tiny.gguf", model, tok)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    ck = import_hf_model(tmp_path)  # the directory holding one .gguf file
    assert ck.format == "gguf" and ck.files == (path,) and ck.architecture == "LlamaForCausalLM"
    assert ck.quantization == {"F32": 5, "Q4_1": 14 + (not tied), "Q8_0": 1}
    assert ck.config.tie_embeddings == tied and {t.dtype for t in ck.state_dict.values()} == {torch.float32}
    ids = _ids(tok)
    with torch.no_grad():
        want, got = reference(ids).logits, _ours(ck)(ids).logits
    assert want.std() > 0.1
    assert (want - got).abs().max().item() <= 1e-4
    # the weights were quantised: the file is not the float model it was written from
    with torch.no_grad():
        assert (model(ids).logits - want).abs().max().item() > 1e-2


def test_an_unquantised_gguf_is_the_model_it_was_written_from(tmp_path):
    """Every tensor F32: the import undoes llama.cpp's q/k permutation (through transformers) exactly."""
    model, tok = tiny_llama()
    path = write_gguf(tmp_path / "f32.gguf", model, tok,
                      edit=lambda t: t.update({k: (v, Q.F32) for k, (v, _) in t.items()}))
    ck = import_hf_model(path, dtype=torch.bfloat16)
    assert ck.quantization == {"F32": 20} and {t.dtype for t in ck.state_dict.values()} == {torch.bfloat16}
    ck = import_hf_model(path)
    ids = _ids(tok)
    with torch.no_grad():
        assert (model(ids).logits - _ours(ck)(ids).logits).abs().max().item() <= 1e-4


def test_bookkeeping_fields_are_recorded_not_refused(tmp_path):
    model, tok = tiny_llama()
    ck = import_hf_model(write_gguf(tmp_path / "tiny.gguf", model, tok))
    assert ck.bookkeeping["_model_name_or_path"] == "Tiny Llama For Tests"  # the file's general.name
    assert (ck.bookkeeping["unk_token_id"], ck.bookkeeping["eos_token_id"]) == (UNK_ID, EOS_ID)


def test_a_directory_transformers_saved_from_a_gguf_imports(tmp_path):
    """The config transformers 5.x builds from a GGUF, saved, holds _model_name_or_path and unk_token_id (the
    loaded model's save_pretrained refuses a GGUF-loaded model, so the config and weights are saved apart)."""
    from safetensors.torch import save_model

    model, tok = tiny_llama()
    path = write_gguf(tmp_path / "tiny.gguf", model, tok)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    transformers.AutoConfig.from_pretrained(tmp_path, gguf_file=path.name).save_pretrained(tmp_path / "saved")
    save_model(reference, str(tmp_path / "saved" / "model.safetensors"))
    tok.save(str(tmp_path / "saved" / "tokenizer.json"))
    ck = import_hf_model(tmp_path / "saved")
    assert ck.format == "safetensors" and ck.bookkeeping["_model_name_or_path"] == "Tiny Llama For Tests"
    ids = _ids(tok)
    with torch.no_grad():
        assert (reference(ids).logits - _ours(ck)(ids).logits).abs().max().item() <= 1e-4


def test_the_tokenizer_is_the_one_transformers_builds_from_the_file(tmp_path):
    model, tok = tiny_llama()
    path = write_gguf(tmp_path / "tiny.gguf", model, tok)
    ours = load_hf_model_tokenizer(path, model.config.vocab_size)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert ours.tokenizer.encode(TEXT).ids == theirs(TEXT).input_ids == tok.encode(TEXT).ids
    assert (ours.eos_id, ours.eos_token, ours.eos_source, ours.files) == (EOS_ID, "<|im_end|>", path.name, (path,))
    named = load_hf_model_tokenizer(path, model.config.vocab_size, eos_token="<|endoftext|>")
    assert (named.eos_id, named.eos_token, named.eos_source) == (0, "<|endoftext|>", None)
    with pytest.raises(ConfigError, match=r"eos_token='<\|end\|>'.*<\|endoftext\|>, <\|im_start\|>, <\|im_end\|>"):
        load_hf_model_tokenizer(path, model.config.vocab_size, eos_token="<|end|>")


def _refusal(call) -> str:
    with pytest.raises(BamError) as err:
        call()
    assert "\n" not in str(err.value)
    return str(err.value)


def test_what_cannot_be_imported_is_one_line(tmp_path, monkeypatch):
    model, tok = tiny_llama()
    base = write_gguf(tmp_path / "tiny.gguf", model, tok)
    several = tmp_path / "several"
    several.mkdir()
    for name in ("a.gguf", "b.gguf"):
        shutil.copy(base, several / name)
    assert "2 .gguf files (a.gguf, b.gguf)" in _refusal(lambda: import_hf_model(several))

    q8_1 = zero_blocks("blk.1.ffn_down.weight", Q.Q8_1)  # a type gguf has no dequantiser for
    line = _refusal(lambda: import_hf_model(write_gguf(tmp_path / "q8_1.gguf", model, tok, edit=q8_1)))
    assert "blk.1.ffn_down.weight" in line and "Q8_1" in line and "dequantise" in line
    for arch, named in (("gpt2", "GPT2Config"), ("nosucharch", "not supported")):
        line = _refusal(lambda: import_hf_model(write_gguf(tmp_path / f"{arch}.gguf", model, tok, arch=arch)))
        assert f"unsupported architecture '{arch}'" in line and named in line and "LlamaForCausalLM" in line
    monkeypatch.setitem(sys.modules, "gguf", None)
    fresh = shutil.copy(base, tmp_path / "fresh.gguf")  # not read before, so nothing of it is cached
    line = _refusal(lambda: import_hf_model(fresh))
    assert "gguf is not installed" in line and "pip install 'bam-pipeline[hf]'" in line
