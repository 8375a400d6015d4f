"""lm-eval adapter: our LM's log-likelihoods equal a direct computation with the model and, item for
item, lm-eval's stock ``hf`` backend run on a Hugging Face export of the same model; rolling
log-likelihood and generate_until agree with it too; lm-eval missing is one line."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from bam_pipeline.data.prepare import open_prepared
from bam_pipeline.errors import BamError
from bam_pipeline.eval import harness
from bam_pipeline.eval.downstream import build_offline_suite
from bam_pipeline.eval.harness import harness_lm
from bam_pipeline.interop.hf_export import ExportTokenizer, ModelCard, write_export
from bam_pipeline.model.generation import generate
from bam_pipeline.store.artifacts import load_model, read_artifact

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

TOLERANCE = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def run(fake_run):
    prepared = open_prepared(fake_run / "data")
    models = {name: load_model(read_artifact(fake_run / path))[0] for name, path in
              (("seed", "seed/main"), ("mixture", "mix/bam"))}
    return prepared, models


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def direct_loglikelihood(model, tokenizer, eos_id: int, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) from one unpadded forward pass, split as lm-eval splits the text."""
    whole = tokenizer.encode(context + continuation).ids
    ctx = tokenizer.encode(context).ids if context else [eos_id]
    cont = whole[len(ctx):] if context else whole
    seq = (ctx + cont)[-(model.cfg.max_seq_len + 1):]
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([seq[:-1]])).logits[0].float(), dim=-1)  # (T, V)
    picked = logprobs[-len(cont):]
    target = torch.tensor(cont)
    return float(picked.gather(-1, target[:, None]).sum()), bool((picked.argmax(-1) == target).all())


def test_loglikelihood_of_a_continuation_equals_a_direct_computation(run):
    prepared, models = run
    tokenizer = prepared.tokenizer()
    pairs = [("class print in try", " return None"), ("the court shall", " hereby"), ("", "the river"),
             (" ".join(["def"] * 40), " lambda yield")]  # a padded batch, an empty context, one over the context
    assert len(tokenizer.encode(pairs[-1][0]).ids) > 64
    for model in models.values():
        lm = harness_lm(model, tokenizer, prepared.eos_id, batch_size=3)
        got = lm.loglikelihood([request("loglikelihood", *p) for p in pairs])
        for (ll, greedy), pair in zip(got, pairs):
            want_ll, want_greedy = direct_loglikelihood(model, tokenizer, prepared.eos_id, *pair)
            assert abs(ll - want_ll) <= TOLERANCE and greedy == want_greedy
            assert ll < 0


def test_rolling_loglikelihood_of_a_short_text_is_its_log_probability_after_eos(run):
    prepared, models = run
    tokenizer = prepared.tokenizer()
    text = "the court shall hereby return"
    lm = harness_lm(models["seed"], tokenizer, prepared.eos_id)
    (got,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)])
    want, _ = direct_loglikelihood(models["seed"], tokenizer, prepared.eos_id, "", text)
    assert abs(got - want) <= TOLERANCE


@pytest.fixture(scope="module")
def hf_backend(run, tmp_path_factory):
    """lm-eval's stock ``hf`` backend over a custom-code export of each model."""
    from lm_eval.models.huggingface import HFLM

    prepared, models = run
    root = tmp_path_factory.mktemp("exports")
    tokenizer = ExportTokenizer(prepared.dir / "tokenizer.json", eos_token="<|endoftext|>", pad_token="<|pad|>")
    out = {}
    for name, model in models.items():
        path = write_export(root / name, model.cfg, model.state_dict(), tokenizer=tokenizer, card=ModelCard(name)).path
        out[name] = HFLM(pretrained=str(path), trust_remote_code=True, batch_size=4, device="cpu", dtype="float32")
    return out


@pytest.mark.parametrize("name", ["seed", "mixture"])
def test_per_item_loglikelihoods_match_lm_evals_hf_backend_on_the_export(run, hf_backend, tmp_path, name):
    prepared, models = run
    suite = build_offline_suite(prepared, tmp_path / "suite", context_tokens=24, passage_tokens=12, max_items=3)
    items = [__import__("json").loads(line) for task in suite.tasks
             for line in (suite.dir / f"{task}.jsonl").read_text().splitlines()]
    requests = [request("loglikelihood", item["context"], choice) for item in items for choice in item["choices"]]
    ours = harness_lm(models[name], prepared.tokenizer(), prepared.eos_id, batch_size=5)
    theirs = hf_backend[name]
    got, want = ours.loglikelihood(requests), theirs.loglikelihood(requests)
    assert len(got) == len(requests) == 4 * len(items) >= 24
    diff = max(abs(g[0] - w[0]) for g, w in zip(got, want))
    print(f"{name}: max |log-likelihood difference| over {len(requests)} items = {diff:.2e}")
    # float32 sums of about 12 log-probabilities near -60: one unit in the last place is 4e-6
    assert all(abs(g[0] - w[0]) <= TOLERANCE + 1e-6 * abs(w[0]) for g, w in zip(got, want))
    assert [g[1] for g in got] == [w[1] for w in want]

    law_test = prepared.stream("law", "test")
    documents = [prepared.tokenizer().decode(law_test.document(i).tolist()) for i in range(2)]
    rolling = [request("loglikelihood_rolling", text) for text in documents]  # longer than the context: windows
    assert all(len(prepared.tokenizer().encode(t).ids) > 2 * models[name].cfg.max_seq_len for t in documents)
    for g, w in zip(ours.loglikelihood_rolling(rolling), theirs.loglikelihood_rolling(rolling)):
        assert abs(g - w) <= 1e-4 * abs(w)  # a sum over hundreds of tokens

    until = {"until": ["court", "\n"], "max_gen_toks": 12, "do_sample": False}
    prompts = [request("generate_until", item["context"], dict(until)) for item in items[:3]]
    assert ours.generate_until(prompts) == theirs.generate_until(prompts)


def test_generate_until_decodes_with_the_kv_cache_and_cuts_at_the_stop_string(run):
    prepared, models = run
    tokenizer, model = prepared.tokenizer(), models["mixture"]
    lm = harness_lm(model, tokenizer, prepared.eos_id)
    context = "the court shall"
    text = tokenizer.decode(generate(model, [tokenizer.encode(context).ids], max_new_tokens=10).tokens[0])
    stop = text[len(text) // 2: len(text) // 2 + 2]
    (got,) = lm.generate_until([request("generate_until", context, {"until": ["never", stop], "max_gen_toks": 10})])
    assert got == text[: text.find(stop)] and len(got) < len(text)


def test_without_lm_eval_the_adapter_is_one_line(run, monkeypatch):
    prepared, models = run
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    harness._lm_class.cache_clear()
    try:
        with pytest.raises(BamError, match="lm-evaluation-harness, which is not installed; install") as e:
            harness_lm(models["seed"], prepared.tokenizer(), prepared.eos_id)
        assert "\n" not in str(e.value)
    finally:
        harness._lm_class.cache_clear()
