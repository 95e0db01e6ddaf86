"""hrnn against a real SLURM cluster: a sweep as one job array, a search, a preempted job and one at its
time limit (each requeued by submitit and resumed by hrnn to the metrics of an uninterrupted run), a
cancelled sweep continued with resume=auto, and a cluster without accounting refused in one line.

Marked `slurm`; skipped with the reason where no cluster accepts jobs. `scripts/slurm_local.sh up` (as
root) brings up the local one-node cluster (.ci/run does). slurmd runs the jobs as root on this same
machine, so the sweeps live under tmp_path. The jobs are tiny. Those that must still be running when
something reaches them (the time limit, scancel) wait at a chosen step, idle, for SLURM's signal
(HRNN_SIGNAL_AT's signal=await), whatever this machine's speed, and say so through a FIFO the test
blocks on (`Arrivals`): nothing here polls or sleeps.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY, compose_config, read_metrics, wait_until_gone, without_wall_times
from hrnn.train.environment import SIGNAL_AT

pytestmark = pytest.mark.slurm

# The reason .ci/run gives when it could not bring the cluster up (shown as the tests' skip reason).
SKIP_ENV = "HRNN_SLURM_SKIP"
# One CPU per job (the local node has two: two jobs at once), little memory, a limit no tiny job reaches.
SLURM = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
         "hydra.launcher.timeout_min=5"]
RUN = ["task=adding", "task.seq_len=16", "basis=binary", "trainer.num_threads=1", *TINY]
SAME = ("val_metric", "test_metric", "best_step", "steps", "val", "test")


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    """Skip the module, in one line, unless sbatch is here and the cluster accepts jobs."""
    if os.environ.get(SKIP_ENV):
        pytest.skip(f"no SLURM cluster: {os.environ[SKIP_ENV]}")
    if shutil.which("sbatch") is None:
        pytest.skip("no SLURM cluster: sbatch not found (scripts/slurm_local.sh up installs one, as root)")
    status = subprocess.run([str(ROOT / "scripts" / "slurm_local.sh"), "status"], capture_output=True, text=True,
                            timeout=60)
    if status.returncode != 0:
        last = (status.stdout + status.stderr).strip().splitlines()[-1:] or ["no answer"]
        pytest.skip(f"no SLURM cluster: scripts/slurm_local.sh status: {' '.join(last[0].split())} "
                    f"(bring it up with scripts/slurm_local.sh up, as root)")


def hrnn_train(args: list[str], cwd: Path, env: dict | None = None, wait: bool = True, timeout: int = 300):
    """hrnn-train ARGS as a user runs it: finished (CompletedProcess), or still running (Popen) with wait=False."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    command = [sys.executable, "-m", "hrnn.cli.train", *args]
    if not wait:
        return subprocess.Popen(command, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def finish(process: subprocess.Popen, timeout: int = 300) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def job_dirs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: int(p.name.partition("_")[0]))


def array_tasks(sweep: Path) -> list[str]:
    """The SLURM ids of the sweep's jobs (<array>_<index>, or one job's plain id), from submitit's folders."""
    tasks = [p.name for p in (sweep / ".submitit").iterdir() if (p / f"{p.name}_submitted.pkl").exists()]
    return sorted(tasks, key=lambda name: int(name.rpartition("_")[2]))


def job_log(sweep: Path, task: str) -> str:
    """What the job printed, hrnn's lines and submitit's, over all its attempts (they append)."""
    folder = sweep / ".submitit" / task
    return "".join((folder / f"{task}_0_log.{kind}").read_text() for kind in ("out", "err"))


def task_of(sweep: Path, job: Path) -> str:
    """The SLURM id of the job that ran in job directory `job` (<sweep>/<num>_<overrides>)."""
    num, tasks = job.name.partition("_")[0], array_tasks(sweep)
    return tasks[0] if len(tasks) == 1 else next(t for t in tasks if t.rpartition("_")[2] == num)


def attempts(task: str) -> list[str]:
    """The states of the job's attempts, oldest first, from accounting (a requeued attempt is REQUEUED).
    The sweep returns as soon as the job's result is written, before the job has ended; a job that depends
    on this one's end (afterany) runs first, so that the controller has recorded it."""
    subprocess.run(["srun", "--quiet", f"--dependency=afterany:{task}", "--ntasks=1", "--cpus-per-task=1",
                    "--mem=100M", "--time=1", "true"], check=True, timeout=120)
    command = ["sacct", "--duplicates", "--allocations", "--noheader", "--parsable2", "--format", "State",
               "--jobs", task]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()


def restarts(task: str) -> int:
    """How often SLURM has requeued the job so far (the controller knows at once; accounting later)."""
    shown = subprocess.run(["scontrol", "show", "job", task], capture_output=True, text=True).stdout
    found = re.search(r"\bRestarts=(\d+)", shown)
    return int(found.group(1)) if found else 0


def same_outcome(metrics: dict, reference: dict) -> None:
    for key in SAME:
        assert metrics[key] == reference[key], key
    assert without_wall_times(metrics["history"]) == without_wall_times(reference["history"])


# ----------------------------------------------------------------------------- a sweep, a search


def test_a_sweep_is_one_job_array_and_a_failed_job_is_kept(tmp_path: Path) -> None:
    """Five jobs as one array; the absurd learning rate makes the last one fail at step 2 (non-finite
    loss): its error.txt says so, the other four finish, and the summary table lists all five."""
    sweep = tmp_path / "sweep"
    result = hrnn_train(["-m", *SLURM, *RUN, "trainer.steps=10", "trainer.eval_every=5",
                         "optim.lr=0.001,0.002,0.003,0.004,1e+30", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    tasks = array_tasks(sweep)
    assert len(tasks) == 5 and len({t.partition("_")[0] for t in tasks}) == 1  # one array
    (array,) = {t.partition("_")[0] for t in tasks}
    assert "#SBATCH --array=0-4%5" in (sweep / ".submitit" / array / f"{array}_submission.sh").read_text()
    *finished, failed = job_dirs(sweep)
    for job in finished:
        metrics = read_metrics(job)
        assert metrics["status"] == "finished" and metrics["steps"] == 10 and metrics["threads"] == 1
    assert "optim.lr=1e+30" in failed.name and not (failed / "metrics.json").exists()
    assert (failed / "error.txt").read_text().startswith("error: non-finite loss or gradient at step 2")
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| optim.lr |") and len(table) == 1 + 5  # the header, a row per learning rate
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: 1 of 5 jobs failed ({failed.name})")
    assert all(state == "COMPLETED" for task in tasks for state in attempts(task))  # a failed run is a job's result


# Tiny trials (test_search.py's); the preset's pruner may act from the first evaluation after 2 trials.
TRIAL = ["model.activation=clock", "task.seq_len=20", "task.n_val=50", "task.n_test=50", "model.hidden_size=16",
         "basis.size=choice(4,8)", "trainer.batch_size=8", "trainer.eval_batch_size=50", "trainer.steps=12",
         "trainer.eval_every=3", "trainer.num_threads=1", "hydra.sweeper.pruner.n_startup_trials=2",
         "hydra.sweeper.pruner.n_warmup_steps=3", "hydra.sweeper.n_jobs=2"]


def test_a_search_through_slurm_prunes_and_continues_with_resume_auto(tmp_path: Path) -> None:
    """Two trials as one array, then resume=auto with n_trials=4 adds a second array of two, where the
    median rule prunes a trial (its evaluations reached the study's SQLite file from a SLURM job)."""
    import optuna

    from hrnn.sweep.search import study_in

    sweep = tmp_path / "sweep"
    args = ["-m", "hparams_search=adding", *SLURM, *TRIAL, f"hydra.sweep.dir={sweep}"]
    first = hrnn_train([*args, "hydra.sweeper.n_trials=2"], tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    before = [(t.number, t.state, t.value, t.params) for t in study_in(sweep).trials]
    assert [state.name for _, state, _, _ in before] == ["COMPLETE", "COMPLETE"]

    result = hrnn_train([*args, "hydra.sweeper.n_trials=4", "resume=auto"], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    study = study_in(sweep)
    assert [(t.number, t.state, t.value, t.params) for t in study.trials[:2]] == before
    assert len(study.trials) == 4 and len({t.partition("_")[0] for t in array_tasks(sweep)}) == 2
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned, "no trial was pruned:\n" + result.stdout[-2000:]
    for trial in pruned:
        assert (sweep / str(trial.number) / "pruned.txt").read_text().startswith("pruned by the search at step")
    for trial in study.trials:
        if trial.state == optuna.trial.TrialState.COMPLETE:
            assert trial.value == read_metrics(sweep / str(trial.number))["val_metric"]


# ----------------------------------------------------------------------------- preemption and the time limit


ONE_JOB = [*RUN, "trainer.steps=20", "trainer.eval_every=5"]


def requeued_once_then_as_uninterrupted(result: subprocess.CompletedProcess, sweep: Path,
                                        tmp_path: Path) -> tuple[int, str]:
    """The sweep of ONE_JOB ended well; its job was stopped by SIGUSR2 at some step with a checkpoint,
    handed over to submitit, requeued once, resumed from that step, and ended as ONE_JOB uninterrupted.
    Returns that step and the job's log."""
    from hrnn.train.loop import train

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (task,) = array_tasks(sweep)
    log = job_log(sweep, task)
    found = re.search(r"stopped by SIGUSR2 at step (\d+); checkpoint saved; handing over to submitit", log)
    assert found, log[-3000:]
    assert "SLURM requeued this job (restart 1)" in log and f"| resuming after step {found.group(1)}" in log
    assert attempts(task) == ["REQUEUED", "COMPLETED"]
    train(compose_config(ONE_JOB), tmp_path / "reference")
    (job,) = job_dirs(sweep)
    same_outcome(read_metrics(job), read_metrics(tmp_path / "reference"))
    return int(found.group(1)), log


def test_a_preempted_job_is_requeued_and_resumes_to_the_uninterrupted_metrics(tmp_path: Path) -> None:
    """SIGUSR2 at step 7 (as `scancel --signal=USR2` or a preemption delivers it; sent from inside the
    job, first attempt only): the job checkpoints step 7, submitit requeues it, and the second attempt
    resumes from step 7 without resume=auto and ends exactly as the uninterrupted run."""
    sweep = tmp_path / "sweep"
    result = hrnn_train(["-m", *SLURM, *ONE_JOB, f"hydra.sweep.dir={sweep}"], tmp_path,
                        env={SIGNAL_AT: "signal=SIGUSR2,step=7"})
    assert requeued_once_then_as_uninterrupted(result, sweep, tmp_path)[0] == 7


def test_a_job_at_its_time_limit_is_requeued_and_resumes_to_the_uninterrupted_metrics(tmp_path: Path,
                                                                                        arrivals) -> None:
    """timeout_min=1, signal_delay_s=10: SLURM checks time limits every 30 s and warns up to 30 s early, so
    SIGUSR2 comes 20 to 50 s into the job, which waits for it at step 5. It checkpoints, submitit requeues
    it and the first attempt exits; then its limit is raised to 5 minutes, so that the second attempt
    finishes instead of being warned again (it would be requeued again, up to max_num_timeout times, only
    slower), and it resumes to the uninterrupted run's metrics."""
    sweep = tmp_path / "sweep"
    process = hrnn_train(["-m", *SLURM, *ONE_JOB, "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=10",
                          f"hydra.sweep.dir={sweep}"], tmp_path,
                         env={SIGNAL_AT: f"signal=await,step=5,notify={arrivals.path}"}, wait=False)
    first_attempt, _ = arrivals.next("job at step 5", 120, process)
    (task,) = array_tasks(sweep)  # submitit wrote the job's folder before the job could start
    wait_until_gone(first_attempt, "end of the first attempt", 150)
    assert restarts(task) == 1  # submitit ran `scontrol requeue` before the attempt exited
    subprocess.run(["scontrol", "update", f"JobId={task}", "TimeLimit=5"], check=True)
    step, log = requeued_once_then_as_uninterrupted(finish(process), sweep, tmp_path)
    assert step >= 5 and "Job has timed out" in log  # submitit's word: SLURM's warning before the limit


# ----------------------------------------------------------------------------- scancel, accounting


def test_scancel_of_a_sweep_keeps_loadable_checkpoints_and_resume_auto_finishes_it(tmp_path: Path,
                                                                                      arrivals) -> None:
    """Both jobs wait at step 11, after their first checkpoint; scancel sends them SIGCONT and
    SIGTERM (SIGKILL 5 s later): each stops at the end of its step with a checkpoint that loads, the
    sweep ends in one line, and the same sweep with resume=auto continues both from there (the first,
    checked, to the uninterrupted run's metrics)."""
    from hrnn.train.loop import train
    from hrnn.train.resume import load_checkpoint

    sweep, run = tmp_path / "sweep", [*RUN, "trainer.steps=30", "trainer.eval_every=10"]
    args = ["-m", *SLURM, *run, "trainer.seed=0,1", f"hydra.sweep.dir={sweep}"]
    process = hrnn_train(args, tmp_path, env={SIGNAL_AT: f"signal=await,step=11,notify={arrivals.path}"}, wait=False)
    for _ in range(2):
        assert arrivals.next("both jobs at step 11", 120, process)[1] == 11
    (array,) = {t.partition("_")[0] for t in array_tasks(sweep)}
    subprocess.run(["scancel", array], check=True)
    cancelled = finish(process)
    assert cancelled.returncode == 2 and "Traceback" not in cancelled.stderr, cancelled.stderr[-3000:]
    assert re.fullmatch(rf"error: SLURM job {array}_[01] ended without a result \(CANCELLED by \d+\); each job's last "
                        r"checkpoint is kept: continue the sweep with the same command and resume=auto",
                        cancelled.stderr.strip().splitlines()[-1])
    for job in job_dirs(sweep):
        assert not (job / "metrics.json").exists()
        assert 11 <= load_checkpoint(job / "checkpoints" / "last.pt")["step"] < 30
        assert re.search(r"stopped by SIGTERM at step \d+; checkpoint saved", job_log(sweep, task_of(sweep, job)))

    continued = hrnn_train([*args, "resume=auto"], tmp_path, wait=False)
    train(compose_config([*run, "trainer.seed=0"]), tmp_path / "reference")
    result = finish(continued)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    resumed = [t for t in array_tasks(sweep) if t.partition("_")[0] != array]
    assert len(resumed) == 2 and all("| resuming after step" in job_log(sweep, task) for task in resumed)
    first, second = job_dirs(sweep)
    same_outcome(read_metrics(first), read_metrics(tmp_path / "reference"))
    assert read_metrics(second)["status"] == "finished" and read_metrics(second)["steps"] == 30


def test_a_cluster_without_accounting_is_refused_in_one_line(tmp_path: Path) -> None:
    """sacct against this cluster's configuration with accounting switched off: the sweep would never
    learn that a cancelled job ended, so it does not start."""
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")).read_text()
    no_accounting = tmp_path / "slurm.conf"
    no_accounting.write_text(re.sub(r"(?m)^AccountingStorageType=.*$", "AccountingStorageType=accounting_storage/none",
                                    conf))
    result = hrnn_train(["-m", *SLURM, *RUN, f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path,
                        env={"SLURM_CONF": str(no_accounting)})
    assert result.returncode == 2 and not (tmp_path / "sweep").exists()
    assert result.stderr.strip().splitlines() == [
        "error: hydra/launcher=slurm needs SLURM's job accounting, and `sacct` fails here (Slurm accounting storage "
        "is disabled): without it a job that dies without a result would keep the sweep waiting forever; ask the "
        "cluster's admins for accounting (slurmdbd), see docs/cluster.md"]
