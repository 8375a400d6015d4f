"""`python -m bam_pipeline`: the Hydra application (see bam_pipeline.cli)."""

from bam_pipeline.cli import main

main()
