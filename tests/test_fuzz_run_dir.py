"""Fuzzing a finished run's files: random bytes, truncations and field edits of last.pt, best.pt,
.hydra/config.yaml and the MNIST data, each read back by hrnn-eval, hrnn-train resume=<run> or a new
run on the data. Every case either succeeds (the edit was harmless) or is refused in one line with
exit 2, no traceback, and no file of the run or its data changed. Seeded: the same cases every time."""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from omegaconf import OmegaConf

from hrnn.tasks.checksums import sums_text
from hrnn.train.resume import FIELDS, OPTIONAL_FIELDS
from test_run_dir_safety import RUN, fake_mnist, hrnn_eval, hrnn_train, snapshot

CASES = 200
SEED = 20261203
# Values a field edit puts in place: wrong types, out of range, huge, empty, and a few that may well be harmless.
VALUES: list[Any] = ["ten", -1, 0, 1, 1.5, float("nan"), 10**12, True, None, [], {}, [1, "a"], {"a": 1},
                     "x" * 300, torch.zeros(3), torch.zeros(2, 2, dtype=torch.uint8), "${nosuch.key}", "data"]
TARGETS = ("checkpoints/last.pt", "checkpoints/best.pt", ".hydra/config.yaml", "data/mnist.npz", "data/mnist.sha256")


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory) -> Path:
    """case/: a finished MNIST run (run/) and its data (data/), as hrnn-train wrote them; pristine/: a copy
    that restores case/ after each case (the run's config names case/data)."""
    root = tmp_path_factory.mktemp("fuzz")
    fake_mnist(root / "case" / "data")
    assert hrnn_train([*RUN, f"data_dir={root / 'case' / 'data'}", f"hydra.run.dir={root / 'case' / 'run'}"]) == 0
    shutil.copytree(root / "case", root / "pristine")
    return root / "case"


def bytes_edit(rng: random.Random, data: bytes) -> bytes:
    """Random bytes, a truncation, flipped bytes, garbage appended, or nothing at all."""
    kind = rng.choice(["random", "truncate", "flip", "append", "empty"])
    if kind == "random":
        return rng.randbytes(rng.choice([1, 64, 4096, len(data)]))
    if kind == "truncate":
        return data[: rng.randrange(len(data))]
    if kind == "flip":
        out = bytearray(data)
        for _ in range(rng.choice([1, 3, 50])):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        return bytes(out)
    return data + rng.randbytes(rng.choice([1, 100])) if kind == "append" else b""


def config_edit(rng: random.Random, text: str) -> str:
    """One key of a YAML config set to a random value, removed, or renamed (as a later hrnn might)."""
    cfg = OmegaConf.create(text)
    keys = [k for k in _leaf_keys(OmegaConf.to_container(cfg))]
    key = rng.choice(keys)
    kind = rng.choice(["value", "remove", "rename"])
    value = OmegaConf.select(cfg, key)
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    del node[leaf]
    if kind == "value":
        new = rng.choice([v for v in VALUES if not isinstance(v, torch.Tensor)])
        node[leaf] = new
    elif kind == "rename":
        node[leaf + "_old"] = value
    return OmegaConf.to_yaml(cfg)


def _leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        keys += _leaf_keys(value, f"{prefix}{key}.") if isinstance(value, dict) and value else [f"{prefix}{key}"]
    return keys


def checkpoint_edit(rng: random.Random, path: Path) -> None:
    """A field of the checkpoint (or a key of its stored config) edited, or its bytes damaged."""
    if rng.random() < 0.35:
        path.write_bytes(bytes_edit(rng, path.read_bytes()))
        return
    state = torch.load(path, weights_only=True)
    field = rng.choice([*FIELDS, *OPTIONAL_FIELDS, "format_version", "config", "config"])
    if field == "config" and rng.random() < 0.7:
        state["config"] = config_edit(rng, state["config"])
    elif field in ("model", "rng", "best", "optimizer", "task") and rng.random() < 0.5:
        inner = state[field]
        if inner:
            key = rng.choice(list(inner))
            inner[key] = rng.choice(VALUES)
    else:
        value = rng.choice(VALUES)
        state.pop(field) if value is None else state.__setitem__(field, value)
    torch.save(state, path)


def data_edit(rng: random.Random, path: Path) -> None:
    """The data file's bytes damaged; sometimes with its checksum recorded anew, as a crafted directory would."""
    path.write_bytes(bytes_edit(rng, path.read_bytes()))
    if path.name == "mnist.npz" and rng.random() < 0.5:
        (path.parent / "mnist.sha256").write_text(sums_text({"mnist.npz": path.read_bytes()}))


def make_case(rng: random.Random, root: Path) -> tuple[str, str, Callable[[], int]]:
    """(what was edited, the command, the command to run) for one case, with the edit already made."""
    target = rng.choice(TARGETS)
    path = root / ("run" if not target.startswith("data/") else "") / target
    if target.endswith(".pt"):
        checkpoint_edit(rng, path)
    elif target.endswith(".yaml"):
        path.write_text(config_edit(rng, path.read_text())) if rng.random() < 0.5 else path.write_bytes(
            bytes_edit(rng, path.read_bytes()))
    else:
        data_edit(rng, path)
    commands = {
        "hrnn-eval": lambda: hrnn_eval([str(root / "run"), f"checkpoint={rng.choice(['best', 'last'])}",
                                        f"out={root / 'eval.json'}"]),
        "hrnn-train resume": lambda: hrnn_train([f"resume={root / 'run'}"]),
        "hrnn-train new run": lambda: hrnn_train([*RUN, f"data_dir={root / 'data'}", f"hydra.run.dir={root / 'new'}"]),
    }
    # Resuming takes a second (Hydra composes its config twice), so it reads only the edited checkpoints, which
    # it checks beyond what hrnn-eval does; the data and .hydra/ are read alike by all.
    weights = [40, 4 if target.endswith(".pt") else 0, 3 if target.startswith("data/") else 0]
    name = rng.choices(list(commands), weights=weights)[0]
    return target, name, commands[name]


def test_fuzzed_run_directories_end_in_one_line_or_succeed(case_dir: Path, capsys) -> None:
    rng = random.Random(SEED)
    root, outcomes = case_dir, {0: 0, 2: 0}
    for case in range(CASES):
        shutil.rmtree(root)
        shutil.copytree(root.parent / "pristine", root)
        target, command, run = make_case(rng, root)
        before = {d: snapshot(root / d) for d in ("run", "data")}
        code = run()
        out, err = capsys.readouterr()
        where = f"case {case}: {command} after editing {target}"
        assert code in (0, 2), f"{where}: exit {code}\n{err[-2000:]}"
        assert "Traceback" not in out + err, f"{where}\n{err[-2000:]}"
        outcomes[code] += 1
        if code == 2:
            lines = [line for line in err.splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith("error: "), f"{where}\n{err}"
        if code == 2 or command == "hrnn-eval":
            assert {d: snapshot(root / d) for d in ("run", "data")} == before, f"{where}\n{err}"
        assert not (root / "new").exists() or code == 0, where
    # Both outcomes in numbers, so that neither path goes untested: about half the edits are refused (92 to
    # over 100 of 200, by the draw, which moves whenever a config gains a key), the rest are harmless.
    assert outcomes[2] >= CASES // 3 and outcomes[0] >= CASES // 10, outcomes
