"""conf/hydra/launcher/slurm.yaml, composed as the CLI composes it and handed to the real submitit
launcher; submission stops at the sbatch file it would submit, so no cluster is needed. Also without a
cluster: the checks before a SLURM sweep, its one-line failures, and a SLURM job's SIGUSR2 handed over
to submitit's requeue and the requeued job resuming (tests/test_slurm_cluster.py does it on a cluster)."""
from __future__ import annotations

import logging
import signal

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from conftest import CONF_DIR, TINY, compose_config, read_metrics, without_wall_times
from hrnn.errors import UserError
from hrnn.train.environment import SIGNAL_AT

submitit = pytest.importorskip("submitit")  # the `sweep` extra, installed by `make install`


class Submitted(Exception):
    """Raised where sbatch would run."""


def compose_slurm(tmp_path, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", return_hydra_config=True,
                       overrides=["hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides])


def sbatch_file(cfg, monkeypatch, jobs: list[list[str]]) -> tuple[str, dict]:
    """What the launcher built from cfg: the sbatch file's text and the executor's parameters."""
    captured = {}

    def submit(executor, command):
        captured["text"] = executor._make_submission_file_text(command, "test")
        captured["parameters"] = dict(executor.parameters)
        raise Submitted

    with pytest.raises(Submitted):
        launch(cfg, monkeypatch, jobs, submit)
    return captured["text"], captured["parameters"]


def launch(cfg, monkeypatch, jobs: list[list[str]], submit) -> None:
    """The launcher of cfg launching `jobs`, with `submit(executor, command)` where sbatch would run."""
    from submitit.slurm.slurm import SlurmExecutor

    monkeypatch.setattr(SlurmExecutor, "affinity", staticmethod(lambda: 1))  # as if srun were on PATH
    monkeypatch.setattr(SlurmExecutor, "_submit_command", submit)
    # An earlier test's Hydra run may leave a log handler on a stream pytest has closed; a failed log
    # write must not print its own traceback into the output this test reads.
    monkeypatch.setattr(logging, "raiseExceptions", False)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    launcher.launch(jobs, initial_job_idx=0)


def test_slurm_defaults_become_one_job_array(tmp_path, monkeypatch):
    cfg = compose_slurm(tmp_path, [])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hrnn_slurm_launcher.launcher.SlurmLauncher"  # submitit's, failing in one line
    assert (launcher.partition, launcher.account, launcher.timeout_min, launcher.cpus_per_task, launcher.gpus_per_node,
            launcher.tasks_per_node, launcher.mem_gb, launcher.array_parallelism) == (None, None, 240, 4, 0, 1, 16, 64)
    assert launcher.max_num_timeout == 3  # requeues at the time limit (submitit's default, 0, fails the job)
    text, parameters = sbatch_file(cfg, monkeypatch, [["trainer.seed=0"], ["trainer.seed=1"], ["trainer.seed=2"]])
    lines = set(text.splitlines())
    for line in ("#SBATCH --time=240", "#SBATCH --cpus-per-task=4", "#SBATCH --gpus-per-node=0", "#SBATCH --mem=16GB",
                 "#SBATCH --ntasks-per-node=1", "#SBATCH --array=0-2%3",
                 "#SBATCH --signal=USR2@120"):  # the warning hrnn checkpoints on (test_robustness)
        assert line in lines, line
    assert not any(line.startswith("#SBATCH --partition") for line in lines)  # null: the cluster's default
    assert parameters["array_parallelism"] == 64
    assert f"#SBATCH --output={tmp_path / 'sweep'}/.submitit/%A_%a/%A_%a_0_log.out" in lines


def test_slurm_overrides_reach_the_sbatch_file(tmp_path, monkeypatch):
    cfg = compose_slurm(tmp_path, ["hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=1",
                                   "hydra.launcher.timeout_min=30", "hydra.launcher.cpus_per_task=2",
                                   "hydra.launcher.mem_gb=8", "hydra.launcher.array_parallelism=1"])
    text, _ = sbatch_file(cfg, monkeypatch, [["trainer.seed=0"], ["trainer.seed=1"]])
    lines = set(text.splitlines())
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1", "#SBATCH --time=30",
                 "#SBATCH --cpus-per-task=2", "#SBATCH --mem=8GB", "#SBATCH --array=0-1%1"):
        assert line in lines, line


# ----------------------------------------------------------------------------- failures outside the jobs


def test_sbatch_refusing_the_jobs_ends_the_sweep_in_one_line(tmp_path, monkeypatch, capsys):
    from submitit.core.utils import FailedJobError

    def refuse(executor, command):
        raise FailedJobError("sbatch: error: Batch job submission failed: More processors requested than permitted")

    with pytest.raises(SystemExit) as ended:
        launch(compose_slurm(tmp_path, []), monkeypatch, [["trainer.seed=0"]], refuse)
    assert ended.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: the cluster refused the sweep's jobs (Batch job submission failed: More processors requested than "
        "permitted); ask for what its nodes have with hydra.launcher.* (docs/cluster.md)"]


def test_a_job_that_ended_without_a_result_is_one_line():
    from hydra_plugins.hrnn_slurm_launcher.launcher import ended_without_result

    message = ("Job 18_0 (task: 0) with path /s/.submitit/18_0/18_0_0_result.pkl\nhas not produced any output "
               "(state: CANCELLED by 0)\nError stream produced:\n----\nsrun: got SIGCONT\n")
    assert ended_without_result(message) == (
        "SLURM job 18_0 ended without a result (CANCELLED by 0); each job's last checkpoint is kept: continue the "
        "sweep with the same command and resume=auto")


def fake_tools(tmp_path, monkeypatch, sacct: str) -> None:
    """PATH holds only an sbatch that succeeds and an sacct that runs `sacct` (shell)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("sbatch", "exit 0"), ("sacct", sacct)):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))


def test_a_slurm_sweep_needs_sbatch_and_an_sacct_that_answers(tmp_path, monkeypatch):
    """Without accounting, submitit would wait forever for a job that died without a result: refused
    up front, in one line (a real cluster without accounting: test_slurm_cluster.py)."""
    from hrnn.cli.train import preflight

    args = ["hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    fake_tools(tmp_path, monkeypatch, "echo 'sacct: error: Sending PersistInit msg: Connection refused' >&2\n"
                                      "echo 'sacct: error: Problem talking to the database: Connection refused' >&2\n"
                                      "exit 1")
    with pytest.raises(UserError, match=r"^hydra/launcher=slurm needs SLURM's job accounting, and `sacct` fails here "
                                        r"\(Problem talking to the database: Connection refused\): without it a job "):
        preflight(args, multirun=True)
    preflight([*args[1:], "hydra/launcher=basic"], multirun=True)  # other launchers need neither
    (tmp_path / "bin" / "sbatch").unlink()
    with pytest.raises(UserError, match=r"^hydra/launcher=slurm needs SLURM's `sbatch` on PATH and it is not there"):
        preflight(args, multirun=True)


# ----------------------------------------------------------------------------- SIGUSR2 in a SLURM job

RUN = ["task=adding", "task.seq_len=16", "basis=binary", "trainer.steps=8", "trainer.eval_every=4", *TINY]


class Submitit:
    """Stands in for submitit in a SLURM job: its SIGUSR2 handler records which step the run's last.pt
    held when it was called, then exits as submitit does after `scontrol requeue`."""

    def __init__(self, run_dir):
        self.run_dir, self.saved_steps = run_dir, []

    def requeue(self, signum, frame):
        import torch

        self.saved_steps.append(torch.load(self.run_dir / "checkpoints" / "last.pt", weights_only=True)["step"])
        raise SystemExit(-1)


@pytest.fixture
def submitit_job(tmp_path, monkeypatch):
    """This process as a SLURM job of submitit, its SIGUSR2 handler installed; SIGUSR2 comes at step 5."""
    submitit = Submitit(tmp_path / "job")
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv(SIGNAL_AT, "signal=SIGUSR2,step=5")
    previous = signal.signal(signal.SIGUSR2, submitit.requeue)
    yield submitit
    signal.signal(signal.SIGUSR2, previous)


def test_sigusr2_in_a_slurm_job_checkpoints_then_submitit_requeues_and_the_job_resumes(tmp_path, monkeypatch,
                                                                                      submitit_job):
    from hrnn.sweep.callbacks import run_job
    from hrnn.train.loop import train

    with pytest.raises(SystemExit) as stopped:
        train(compose_config(RUN), submitit_job.run_dir)
    assert stopped.value.code == -1 and submitit_job.saved_steps == [5]  # called once, after last.pt of step 5
    assert signal.getsignal(signal.SIGUSR2) == submitit_job.requeue  # put back first, for submitit's own exit
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the requeued attempt: the same job, no resume=auto
    run_job(train, compose_config(RUN), submitit_job.run_dir)
    assert submitit_job.saved_steps == [5]  # the scheduled signal stands for one preemption, not one per attempt
    for name in ("SUBMITIT_EXECUTOR", "SLURM_RESTART_COUNT", SIGNAL_AT):
        monkeypatch.delenv(name)
    train(compose_config(RUN), tmp_path / "reference")
    resumed, reference = read_metrics(submitit_job.run_dir), read_metrics(tmp_path / "reference")
    for key in ("val_metric", "test_metric", "best_step", "steps", "val", "test"):
        assert resumed[key] == reference[key], key
    assert without_wall_times(resumed["history"]) == without_wall_times(reference["history"])


def test_a_requeue_submitit_declines_fails_the_job_in_one_line(submitit_job):
    from hrnn.train.loop import train

    def decline(signum, frame):
        raise RuntimeError("Job not requeued because: timed-out too many times.")

    signal.signal(signal.SIGUSR2, decline)
    with pytest.raises(UserError, match=r"^stopped by SIGUSR2 at step 5; checkpoint saved; not requeued \(Job not "
                                        r"requeued because: timed-out too many times.\); continue with the same sweep "
                                        r"and resume=auto$"):
        train(compose_config(RUN), submitit_job.run_dir)


def test_outside_slurm_sigusr2_stops_as_before_even_with_a_handler_installed(monkeypatch, submitit_job):
    from hrnn.train.loop import train

    monkeypatch.delenv("SUBMITIT_EXECUTOR")  # e.g. submitit_local, which restarts a job without telling it
    with pytest.raises(SystemExit) as stopped:
        train(compose_config(RUN), submitit_job.run_dir)
    assert stopped.value.code == 128 + signal.SIGUSR2 and submitit_job.saved_steps == []
