

def test_changes_names_what_differs_and_the_seed_tokenizer_it_needs():
    from bam_pipeline.data.prepare import changes

    old = {"config": {"split": {"val": 0.1}, "tokenizer": {"from_seed_checkpoint": {"sha": "x"}}}, "sources_hash": "a"}
    now = {"split": {"val": 0.1}, "tokenizer": {"vocab_size": 512}}
    why = changes(old, now, "a")
    assert why.startswith("data config changed: tokenizer;") and "seed=hf seed.path=" in why, why
    assert changes(old, {**now, "split": {"val": 0.2}}, "b").startswith(
        "data config changed: split, tokenizer; a source's contents changed")
    assert changes(old, old["config"], "a") == "data config changed"  # the hashes differ by nothing we record
