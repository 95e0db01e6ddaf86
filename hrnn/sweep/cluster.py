"""What a sweep through SLURM (hydra/launcher=slurm) needs of the cluster, checked before anything is
submitted (docs/cluster.md).

submitit learns that a job ended from the result file the job writes, or, for a job that died without
writing one (cancelled, killed at its time limit, out of memory, its node lost), only from `sacct`.
Where `sacct` does not answer (no accounting storage, slurmdbd down), submitit logs the error and asks
again, forever: the sweep would hang on such a job. So a SLURM sweep starts only where `sbatch` exists
and `sacct` answers, and otherwise ends at once in one line saying why.
"""
from __future__ import annotations

import shutil
import subprocess

from omegaconf import DictConfig

from hrnn.errors import UserError

SACCT_TIMEOUT_S = 30
# A query of one job id: it needs the accounting storage to answer, and it is cheap when it does.
SACCT_PROBE = ("sacct", "--noheader", "--allocations", "--jobs", "1", "--format", "JobID")


def is_slurm(launcher: DictConfig | None) -> bool:
    return launcher is not None and str(launcher.get("_target_", "")).endswith("SlurmLauncher")


def check_cluster(launcher: DictConfig | None) -> None:
    """UserError unless sbatch and sacct are on PATH and sacct answers; nothing for other launchers."""
    if not is_slurm(launcher):
        return
    for tool in ("sbatch", "sacct"):
        if shutil.which(tool) is None:
            raise UserError(f"hydra/launcher=slurm needs SLURM's `{tool}` on PATH and it is not there; run the "
                            f"sweep on a machine of the cluster (a login node), or choose another hydra/launcher")
    reason = sacct_failure()
    if reason is not None:
        raise UserError(f"hydra/launcher=slurm needs SLURM's job accounting, and `sacct` fails here ({reason}): "
                        f"without it a job that dies without a result would keep the sweep waiting forever; "
                        f"ask the cluster's admins for accounting (slurmdbd), see docs/cluster.md")


def sacct_failure() -> str | None:
    """Why `sacct` cannot tell job states, or None when it answers. Its last line is the reason
    ("Problem talking to the database: Connection refused"); the lines before it, the attempts."""
    try:
        probe = subprocess.run(SACCT_PROBE, capture_output=True, text=True, timeout=SACCT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"no answer in {SACCT_TIMEOUT_S} s"
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    if probe.returncode == 0:
        return None
    lines = [line.strip() for line in (probe.stderr + probe.stdout).splitlines() if line.strip()]
    return lines[-1].removeprefix("sacct: error: ") if lines else f"exit status {probe.returncode}"
