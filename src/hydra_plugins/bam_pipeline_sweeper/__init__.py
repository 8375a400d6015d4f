"""bam-pipeline's sweeper as a Hydra plugin (Hydra instantiates plugins only from the ``hydra_plugins``
namespace), chosen by ``conf/hydra/sweeper/every_job.yaml``, the default of bam-pipeline's config. Its sweep
is :func:`bam_pipeline.sweeps.sweep_every_job`. Defined here, not imported: Hydra's plugin scan executes its
plugin modules again, so a subclass must be made from the BasicSweeper the scan left."""

from typing import Any, List

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper


class EveryJobSweeper(BasicSweeper):
    """Hydra's basic sweeper, except that a failed job does not end the sweep (bam_pipeline.sweeps)."""

    def sweep(self, arguments: List[str]) -> Any:
        from bam_pipeline.sweeps import sweep_every_job

        return sweep_every_job(self, arguments)
