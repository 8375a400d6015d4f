"""Total training compute: a model's own training FLOPs plus those of every artifact it was built from, each
counted once, read from what the manifests record as inputs."""

import json

import pytest

from bam_pipeline.errors import BamError
from bam_pipeline.model.config import preset
from bam_pipeline.model.counting import training_flops_per_token
from bam_pipeline.store.artifacts import Artifact
from bam_pipeline.store.lineage import Built, lineage_of, total_compute, total_training_flops, training_flops

# a run's lineage: the seed feeds three experts (a diamond: every expert leads back to it); BAM's mixture reads
# the seed and the experts, dense reads the seed alone
RUN = {
    "seed": Built(100.0),
    "branch/code": Built(10.0, ("seed",)),
    "branch/math": Built(20.0, ("seed",)),
    "branch/law": Built(30.0, ("seed",)),
    "mix/bam": Built(0.0, ("seed", "branch/code", "branch/math", "branch/law")),
    "moe/bam": Built(7.0, ("mix/bam",)),
    "mix/dense": Built(0.0, ("seed",)),
    "moe/dense": Built(9.0, ("mix/dense",)),
}


def test_each_artifact_counts_once_through_a_diamond():
    # the seed is reached through the mixture and through each of the three experts: counted once
    assert total_training_flops(RUN, ["moe/bam"]) == 7 + 0 + 100 + 10 + 20 + 30
    assert total_training_flops(RUN, ["branch/math"]) == 20 + 100
    assert total_training_flops(RUN, ["seed"]) == 100


def test_a_model_that_did_not_read_the_experts_does_not_count_them():
    assert total_training_flops(RUN, ["moe/dense"]) == 9 + 0 + 100


def test_an_ensemble_counts_its_members_and_their_common_seed_once():
    assert total_training_flops(RUN, ["seed", "branch/code", "branch/math", "branch/law"]) == 160


def test_an_input_outside_the_lineage_is_refused_by_name():
    broken = {**RUN, "moe/bam": Built(7.0, ("mix/bam@0123456789ab",))}
    with pytest.raises(BamError, match="mix/bam@0123456789ab"):
        total_training_flops(broken, ["moe/bam"])
    assert total_compute(broken, ["moe/bam"]) is None and total_compute(broken, ["moe/dense"]) == 109


def _art(tmp_path, stage, name, flops, inputs, **fields):
    path = tmp_path / stage / name
    path.mkdir(parents=True)
    manifest = {"stage": stage, "name": name, "hash": f"h-{stage}-{name}", "files": {}, "flops": flops,
                "inputs": {k: {"path": str(tmp_path / p), "hash": h} for k, (p, h) in inputs.items()}, **fields}
    if flops is None:
        del manifest["flops"]
    return Artifact(path, manifest)


def test_lineage_follows_the_recorded_inputs_and_refuses_a_rebuilt_one(tmp_path):
    seed = _art(tmp_path, "seed", "main", 100.0, {"data": ("data", "d")})
    code = _art(tmp_path, "branch", "code", 10.0, {"data": ("data", "d"), "seed": ("seed/main", seed.hash)})
    mix = _art(tmp_path, "mix", "bam", 0.0, {"seed": ("seed/main", seed.hash), "branch/code": ("branch/code", code.hash)})
    moe = _art(tmp_path, "moe", "bam", 7.0, {"data": ("data", "d"), "mix": ("mix/bam", mix.hash)})
    stale = _art(tmp_path, "moe", "btx", 5.0, {"mix": ("mix/btx", "an-older-mix")})
    lineage = lineage_of([seed, code, mix, moe, stale])
    assert lineage["moe/bam"] == Built(7.0, ("mix/bam",))  # the data is an input that trains nothing
    assert lineage["mix/bam"].inputs == ("seed", "branch/code")
    assert total_training_flops(lineage, ["moe/bam"]) == 117
    assert total_compute(lineage, ["moe/btx"]) is None  # built from a mixture the run no longer has


def test_flops_from_tokens_where_a_manifest_lacks_them(tmp_path):
    cfg = preset("smoke")
    art = _art(tmp_path, "seed", "main", None, {}, tokens=4096, config={"train": {"seq_len": 32}})
    (art.path / "model_config.json").write_text(json.dumps(cfg.to_dict()))
    assert training_flops(art) == pytest.approx(4096 * training_flops_per_token(cfg, 32))
    assert training_flops(_art(tmp_path, "branch", "copy", None, {}, tokens=0)) == 0.0
