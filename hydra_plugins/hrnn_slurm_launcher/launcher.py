"""hydra/launcher=slurm's launcher: hydra-submitit-launcher's, ending the sweep in one line (instead of
submitit's traceback) when something goes wrong outside the jobs (docs/cluster.md). It lives here
because Hydra takes launchers only from the hydra_plugins package.

Two things can: sbatch refuses the job array (more CPUs or memory than a node has, an unknown
partition or account), or a job ends without a result, which submitit learns from sacct: cancelled
(scancel), killed at its time limit or for its memory, its node lost. The sweep then stops waiting;
jobs still queued or running go on in SLURM, and every job's last checkpoint stays where it is, so the
same sweep with resume=auto continues them. A failure inside a job is its own (its error.txt), and a
preempted job is requeued and resumes by itself (hrnn.train.environment.StopSignals).
"""
from __future__ import annotations

import re
from typing import Sequence

from hydra.core.utils import JobReturn

from hrnn.cli.wrapper import user_errors
from hrnn.errors import UserError

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher
except ImportError:  # no `sweep` extra: Hydra scans this module all the same, and must not warn
    SubmititSlurmLauncher = None

CONTINUE = "each job's last checkpoint is kept: continue the sweep with the same command and resume=auto"


class SlurmLauncher(SubmititSlurmLauncher or object):  # without the extra, a class Hydra does not register
    """The SLURM launcher of hydra-submitit-launcher, its failures outside the jobs in one line."""

    @user_errors
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from submitit.core.utils import FailedJobError, UncompletedJobError

        try:
            return super().launch(job_overrides, initial_job_idx)
        except FailedJobError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            if not first.startswith("sbatch"):
                raise  # a job that failed in submitit's own code, before hrnn's: its traceback is the news
            raise UserError(f"the cluster refused the sweep's jobs ({first.removeprefix('sbatch: error: ')}); "
                            f"ask for what its nodes have with hydra.launcher.* (docs/cluster.md)") from None
        except UncompletedJobError as exc:
            raise UserError(ended_without_result(str(exc))) from None


def ended_without_result(message: str) -> str:
    """submitit's "Job 12_3 (task: 0) with path ... has not produced any output (state: CANCELLED by 0)", in a line."""
    found = re.search(r"Job (\S+) .*?has not produced any output \(state: ([^)]*)\)", message, re.DOTALL)
    if found is None:
        return f"a SLURM job ended without a result ({message.strip().splitlines()[0]}); {CONTINUE}"
    return f"SLURM job {found.group(1)} ended without a result ({found.group(2)}); {CONTINUE}"
