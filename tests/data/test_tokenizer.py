"""The run's tokenizer: exact round-trip on code and prose, end-of-document token, hash, a given file."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from bam_pipeline.data import tokenizer as tk
from bam_pipeline.data.spec import read_data_spec
from bam_pipeline.data.prepare import prepare_data
from bam_pipeline.data.storage import read_shard
from bam_pipeline.errors import BamError

from tokenizers import Tokenizer

CODE = Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text()
PROSE = "To be, or not to be, that is the question:\n\tWhether 'tis nobler in the mind to suffer\n  — naïve café, 数学 ∑ x² 🙂\r\n"


@pytest.mark.parametrize("text", [CODE, PROSE, "", "   \n\n  x"])
def test_round_trip_is_exact(real_prepared, text):
    tok = real_prepared.tokenizer()
    ids = tok.encode(text).ids
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_trained_tokenizer_compresses_code_and_prose(real_prepared):
    tok = real_prepared.tokenizer()
    assert tok.get_vocab_size() == real_prepared.vocab_size == 512
    plain = "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune, "
    for text in (CODE, plain * 20):
        assert len(tok.encode(text).ids) < 0.6 * len(text.encode())


def test_eos_and_hash_are_recorded(real_prepared):
    tok = real_prepared.tokenizer()
    assert tok.token_to_id(tk.EOS) == real_prepared.eos_id
    assert tk.tokenizer_hash(tok) == real_prepared.tokenizer_hash == real_prepared.manifest["tokenizer_hash"]
    stream = real_prepared.stream("code", "val")
    n_docs = real_prepared.stats["code"]["val"]["documents"]
    assert int((stream.take(0, len(stream)) == real_prepared.eos_id).sum()) == n_docs


def test_given_tokenizer_file_is_used_as_is(synthetic, tmp_path):
    cfg, prepared = synthetic
    given = dict(cfg, tokenizer={**cfg["tokenizer"], "path": str(prepared.dir / "tokenizer.json")})
    again = prepare_data(read_data_spec(given), tmp_path / "data", progress=False)
    assert again.tokenizer_hash == prepared.tokenizer_hash
    assert again.stats == prepared.stats


def test_given_tokenizer_without_eos_is_refused(tmp_path):
    bare = tk.train_bpe(["abc abd abe"] * 10, 300)
    plain = Tokenizer.from_str(bare.to_str())
    path = tmp_path / "tokenizer.json"
    plain.save(str(path))
    with pytest.raises(BamError, match="has no end-of-document token '<eos>'"):
        tk.load_tokenizer(path, "<eos>")
    with pytest.raises(BamError, match="does not exist"):
        tk.load_tokenizer(tmp_path / "missing.json")


@pytest.mark.parametrize("text", [CODE, PROSE, "x"])
def test_token_byte_lengths_add_up_to_the_texts_utf8_bytes(real_prepared, text):
    """Bits per byte count the scored tokens' own bytes: a byte-level tokenizer's tokens add up to the text's
    UTF-8 length exactly, multi-byte characters split across tokens included; the end of document adds none."""
    tok = real_prepared.tokenizer()
    lengths = tk.token_byte_lengths(tok)
    ids = tok.encode(text).ids + [real_prepared.eos_id]
    assert int(lengths[ids].sum()) == len(text.encode())
    assert lengths[real_prepared.eos_id] == 0 and len(lengths) == tok.get_vocab_size(with_added_tokens=True)


def test_token_byte_lengths_match_every_stored_documents_bytes(real_prepared):
    """On the stored test split: each document's tokens (its end-of-document token included) at their byte
    lengths give the byte count the data stage recorded for its text."""
    lengths = tk.token_byte_lengths(real_prepared.tokenizer())
    stream = real_prepared.stream(real_prepared.sources[0], "test")
    docs = stream.documents()
    recorded = [b for f in stream.files for b in read_shard(f).column("bytes").to_pylist()]
    assert docs and [int(lengths[d].sum()) for d in docs] == recorded


def test_token_byte_lengths_refuse_a_tokenizer_that_is_not_byte_level():
    from tokenizers import models, pre_tokenizers

    words = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    assert tk.token_byte_lengths(words) is None
