"""The run's tokenizer: exact round-trip on code and prose, end-of-document token, hash, a given file."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from bam_pipeline.data import tokenizer as tk
from bam_pipeline.data.spec import read_data_spec
from bam_pipeline.data.prepare import prepare_data
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
