"""The paper's own small-scale Table 1 (perplexity, lower is better), kept as data.

Numbers copied from /work/shared/docs/paper.md section 8, which quotes Table 1 of Zhang et al., "BAM! Just
Like That: Simple and Efficient Parameter Upcycling for Mixture of Experts", arXiv 2408.08274
(NeurIPS 2024). Rows use this project's artifact labels and columns its source names, so the same
table and claim code reads the paper's numbers and the run's.
"""

from __future__ import annotations

CITATION = (
    'Zhang et al., "BAM! Just Like That: Simple and Efficient Parameter Upcycling for Mixture of '
    'Experts", arXiv 2408.08274 (NeurIPS 2024), Table 1 (small scale, perplexity)'
)

# The paper's "Pretrain" column is this project's general source.
PAPER_COLUMNS: tuple[str, ...] = ("general", "code", "law", "math")

PAPER_TABLE1: dict[str, dict[str, float]] = {
    "seed": {"general": 23.98, "code": 8.62, "law": 8.92, "math": 14.12},
    "branch/code": {"general": 39.50, "code": 3.71, "law": 10.83, "math": 8.77},
    "branch/law": {"general": 87.82, "code": 23.45, "law": 7.53, "math": 30.79},
    "branch/math": {"general": 57.61, "code": 6.78, "law": 10.43, "math": 5.67},
    "moe/btx": {"general": 26.72, "code": 3.78, "law": 6.63, "math": 5.77},
    "moe/bam": {"general": 24.02, "code": 3.45, "law": 6.04, "math": 5.31},
    "moe/bam_kv_shared": {"general": 25.67, "code": 3.64, "law": 6.39, "math": 5.57},
    "moe/bam_cm": {"general": 24.84, "code": 3.53, "law": 6.21, "math": 5.43},
}

# Display names and roles of the paper's rows (the run's own come from its manifests).
PAPER_NAMES: dict[str, str] = {
    "seed": "Seed", "branch/code": "Code expert", "branch/law": "Law expert", "branch/math": "Math expert",
    "moe/btx": "BTX", "moe/bam": "BAM (expert KV)", "moe/bam_kv_shared": "BAM (shared KV)",
    "moe/bam_cm": "BAM CM (expert KV)", "moe/btx_matched": "BTX parameter-matched",
}
PAPER_ROLES: dict[str, str] = {
    "seed": "seed", "branch/code": "expert", "branch/law": "expert", "branch/math": "expert",
    "moe/btx": "mixture", "moe/bam": "mixture", "moe/bam_kv_shared": "mixture", "moe/bam_cm": "mixture",
}

# The paper's Table 3 (downstream tasks, 2B scale only): docs/paper.md section 10 quotes the average over its
# tasks (GSM8K, MATH, HumanEval, MBPP, LegalBench ICQ, NQ, TriviaQA, ARC-E/C, SIQA, PIQA, WinoGrande, QuAC,
# MMLU) per model, in percent; no per-task number.
TABLE3_CITATION = "Zhang et al., arXiv 2408.08274, Table 3, 2B scale"
TABLE3_AVERAGES: dict[str, float] = {
    "Seed": 31.60, "BTX": 32.71, "BAM DM (expert KV)": 34.02, "BAM CM (expert KV)": 33.50,
    "BAM DM (shared KV)": 33.98,
}

# The paper's serving cost at 590M scale, by this project's artifact labels (docs/paper.md section 10): Table 7's
# forward FLOPs per token at context 256 without the LM head (the figures of one block), and section 7.3's seconds
# to generate 16 tokens from a 256-token prompt (the mean of 10 runs, on TPUs).
SERVING_CITATION = "Zhang et al., arXiv 2408.08274, Table 7 and section 7.3 (590M scale)"
TABLE7_FLOPS: dict[str, int] = {"moe/bam": 48_257_024, "moe/btx": 21_510_144, "moe/btx_matched": 46_692_352}
SECTION73_SECONDS: dict[str, float] = {"moe/bam": 6.17, "moe/bam_kv_shared": 5.96, "moe/btx": 4.81}
