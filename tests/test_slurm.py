"""conf/hydra/launcher/slurm.yaml, composed as the CLI composes it and handed to the real submitit
launcher; submission stops at the sbatch file it would submit, so no cluster is needed."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from conftest import CONF_DIR

submitit = pytest.importorskip("submitit")  # the `sweep` extra, installed by `make install`


class Submitted(Exception):
    """Raised where sbatch would run."""


def compose_slurm(tmp_path, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", return_hydra_config=True,
                       overrides=["hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides])


def sbatch_file(cfg, monkeypatch, jobs: list[list[str]]) -> tuple[str, dict]:
    """What the launcher built from cfg: the sbatch file's text and the executor's parameters."""
    from submitit.slurm.slurm import SlurmExecutor

    captured = {}

    def submit(executor, command):
        captured["text"] = executor._make_submission_file_text(command, "test")
        captured["parameters"] = dict(executor.parameters)
        raise Submitted

    monkeypatch.setattr(SlurmExecutor, "affinity", staticmethod(lambda: 1))  # as if srun were on PATH
    monkeypatch.setattr(SlurmExecutor, "_submit_command", submit)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    with pytest.raises(Submitted):
        launcher.launch(jobs, initial_job_idx=0)
    return captured["text"], captured["parameters"]


def test_slurm_defaults_become_one_job_array(tmp_path, monkeypatch):
    cfg = compose_slurm(tmp_path, [])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.timeout_min, launcher.cpus_per_task, launcher.gpus_per_node,
            launcher.tasks_per_node, launcher.mem_gb, launcher.array_parallelism) == (None, 240, 4, 0, 1, 16, 64)
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
