"""Evaluation and report: every model artifact on every source's test split, routing analysis,
and the run's report (Table 1 analogue beside the paper's, ordering claims, costs, plots).

Entry points: :func:`bam_pipeline.eval.runner.run_eval` and :func:`bam_pipeline.eval.report.build_report`.
"""
