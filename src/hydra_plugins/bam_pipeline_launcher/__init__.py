"""bam-pipeline's local launcher as a Hydra plugin (Hydra instantiates plugins only from the ``hydra_plugins``
namespace), chosen by ``hydra/launcher=local`` (``conf/hydra/launcher/local.yaml``). Its work is
:func:`bam_pipeline.launcher.launch`: a sweep's jobs side by side, each a process in its own device slot."""

from typing import Any, List, Optional, Sequence, Tuple

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher


class LocalLauncher(Launcher):
    def __init__(self, devices: Any = None, cores: Any = None, threads: Optional[int] = None,
                 max_parallel: Optional[int] = None) -> None:
        self.devices, self.cores, self.threads, self.max_parallel = devices, cores, threads, max_parallel
        self.config: Any = None
        self.hydra_context: Any = None
        self.task_function: Any = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        return self.launch_numbered([(initial_job_idx + i, o) for i, o in enumerate(job_overrides)])

    def launch_numbered(self, jobs: List[Tuple[int, Sequence[str]]]) -> Sequence[JobReturn]:
        """Jobs with their own numbers, not necessarily consecutive (bam-pipeline's sweeper hands over all the
        composable jobs of a batch at once, around one it could not compose, so that they run side by side)."""
        from bam_pipeline.cli import as_typed, users_environment
        from bam_pipeline.launcher import launch

        return launch(self, jobs, typed=as_typed, env=users_environment())
