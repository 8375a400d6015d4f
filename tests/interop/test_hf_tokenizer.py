"""The checkpoint's tokenizer: tokenizer.json as is, SentencePiece-only converted by transformers
(or refused without it), the end-of-document id, vocabulary against embedding rows, per-document
encoding with the tokenizer's own post-processor."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from tokenizers import Tokenizer, processors

from hf_checkpoints import BOS_ID, EOS_ID, VOCAB_ROWS, tiny_tokenizer
from bam_pipeline.errors import BamError
from bam_pipeline.interop import encode_documents, load_hf_model_tokenizer
from bam_pipeline.interop.hf_tokenizer import check_vocabulary, end_of_document_id, load_tokenizer


def checkpoint(tmp_path, *, config=None, generation=None, tokenizer: Tokenizer | None = None):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **(config or {})}))
    if generation is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    (tokenizer or tiny_tokenizer()).save(str(tmp_path / "tokenizer.json"))
    return tmp_path


def test_tokenizer_json_is_used_as_is_with_eos_from_config(tmp_path):
    ck = load_hf_model_tokenizer(checkpoint(tmp_path, config={"eos_token_id": EOS_ID}), VOCAB_ROWS)
    assert ck.tokenizer.to_str() == tiny_tokenizer().to_str()
    assert (ck.eos_id, ck.eos_token, ck.eos_source, ck.converted_from_sentencepiece) == \
        (EOS_ID, "</s>", "config.json", False)
    assert ck.files == (tmp_path / "tokenizer.json", tmp_path / "config.json")


def test_eos_is_the_first_of_a_list_and_falls_back_to_generation_config(tmp_path):
    path = checkpoint(tmp_path, config={"eos_token_id": [EOS_ID, 0]})
    assert end_of_document_id(path) == (EOS_ID, "config.json")
    path = checkpoint(tmp_path, config={"eos_token_id": None}, generation={"eos_token_id": [0, EOS_ID]})
    assert end_of_document_id(path) == (0, "generation_config.json")
    path = checkpoint(tmp_path, config={"eos_token_id": "</s>"})
    with pytest.raises(BamError, match="eos_token_id='</s>', not a token id"):
        end_of_document_id(path)
    (tmp_path / "generation_config.json").unlink()
    path = checkpoint(tmp_path, config={})
    with pytest.raises(BamError, match="names no eos_token_id in config.json or generation_config.json"):
        end_of_document_id(path)


def test_eos_outside_the_tokenizer_is_refused(tmp_path):
    with pytest.raises(BamError, match="eos_token_id=90 from config.json is not a token of the checkpoint's tokenizer"):
        load_hf_model_tokenizer(checkpoint(tmp_path, config={"eos_token_id": 90}), VOCAB_ROWS)


def test_embedding_rows_may_exceed_the_tokenizer_but_not_fall_short():
    tok = tiny_tokenizer()  # ids 0..31
    check_vocabulary(tok, 32)
    check_vocabulary(tok, 151936)
    with pytest.raises(BamError, match=r"tokenizer id 31 \(','\) has no row in the model's 31-row embedding"):
        check_vocabulary(tok, 31)
    tok.add_special_tokens(["<|pad|>"])  # an added token past the base vocabulary counts too
    with pytest.raises(BamError, match="tokenizer id 32 .'<|pad|>'. has no row"):
        check_vocabulary(tok, 32)


def test_missing_and_broken_tokenizers(tmp_path):
    with pytest.raises(BamError, match="has no tokenizer.json .nor a SentencePiece tokenizer.model."):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(BamError, match="cannot read .*tokenizer.json"):
        load_tokenizer(tmp_path)


def test_documents_get_the_post_processors_bos_and_one_eos():
    tok = tiny_tokenizer()
    docs = encode_documents(tok, ["ab", "", "c"], EOS_ID)
    a, b, c = (tok.token_to_id(ch) for ch in "abc")
    assert docs == [[BOS_ID, a, b, EOS_ID], [BOS_ID, EOS_ID], [BOS_ID, c, EOS_ID]]
    # a post-processor that ends documents itself gets no second EOS
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", BOS_ID),
                                                                                            ("</s>", EOS_ID)])
    assert encode_documents(tok, ["ab"], EOS_ID) == [[BOS_ID, a, b, EOS_ID]]


def _write_sentencepiece_model(path):
    """A tiny unigram SentencePiece model, written with the protobuf schema sentencepiece (or
    transformers) ships; the sentencepiece library itself is not needed to write one."""
    if importlib.util.find_spec("sentencepiece") is not None:
        from sentencepiece import sentencepiece_model_pb2 as pb
    else:
        from transformers.utils import sentencepiece_model_pb2_new as pb
    m = pb.ModelProto()
    m.trainer_spec.model_type = 1  # unigram
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id, m.trainer_spec.pad_id = 0, 1, 2, -1
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = True
    for piece, kind in (("<unk>", 2), ("<s>", 3), ("</s>", 3)):
        m.pieces.add(piece=piece, score=0.0, type=kind)
    for i, piece in enumerate("▁abcdefghijklmnopqrstuvwxyz"):
        m.pieces.add(piece=piece, score=-1.0 - i * 0.01, type=1)
    for piece in ("▁the", "▁fox"):
        m.pieces.add(piece=piece, score=-0.5, type=1)
    path.write_bytes(m.SerializeToString())


def test_sentencepiece_only_is_converted_by_transformers_or_refused_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "eos_token_id": 2}))
    _write_sentencepiece_model(tmp_path / "tokenizer.model")
    if importlib.util.find_spec("sentencepiece") is None:
        with pytest.raises(BamError, match="transformers could not convert .*tokenizer.model .*install sentencepiece") \
                as err:
            load_hf_model_tokenizer(tmp_path, 64)
        assert "\n" not in str(err.value)
        return
    from transformers import AutoTokenizer

    ck = load_hf_model_tokenizer(tmp_path, 64)
    assert ck.converted_from_sentencepiece and ck.eos_token == "</s>"
    assert ck.files == (tmp_path / "tokenizer.model", tmp_path / "config.json")
    want = AutoTokenizer.from_pretrained(str(tmp_path))("the fox jumps", add_special_tokens=True).input_ids
    assert ck.tokenizer.encode("the fox jumps").ids == want
    assert ck.tokenizer.encode("the fox").tokens[-2:] == ["▁the", "▁fox"]


def test_sentencepiece_only_without_transformers_is_refused(tmp_path, monkeypatch):
    (tmp_path / "tokenizer.model").write_bytes(b"unused")
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(BamError, match="only a SentencePiece tokenizer.model; converting it needs transformers"):
        load_tokenizer(tmp_path)
