"""hrnn-sample: text written by a text run's model (task=text), from one of its checkpoints.

    hrnn-sample <run dir> [prompt=TEXT] [length=N] [temperature=X] [seed=N] [checkpoint=best|last] [data_dir=DIR]

The model reads the prompt from a zero state, then draws `length` characters one at a time from
softmax(logits / temperature), each drawn character its next input (the <unk> id is never drawn). The
draws come from a torch.Generator seeded with `seed`, so the same arguments give the same text. In the
prompt, \\n and \\t stand for a newline and a tab; the default prompt is a newline.

The clock reads the prompt and the drawn text as it reads a training stream (hrnn/tasks/text.py, "Clock"):
character k of prompt + text is at wave index k mod T. The state is carried across every multiple of T, and
within a window the model reads the window's characters so far again from the window's start state, so
each step sees its wave index (a pass of k < T steps reads the first k of the T-step waves).

The text (prompt included) is printed and saved as <run dir>/samples/<time>_<checkpoint>_seed<seed>.txt,
with the settings beside it in a .json of the same name. The vocabulary comes from the run's text, which
must still be in its data_dir (or give data_dir=DIR).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hrnn.cli.wrapper import user_errors
from hrnn.errors import UserError

USAGE = ("usage: hrnn-sample <run dir> [prompt=TEXT] [length=N] [temperature=X] [seed=N] [checkpoint=best|last] "
         "[data_dir=DIR]")
DEFAULTS: dict[str, Any] = {"prompt": "\n", "length": 500, "temperature": 1.0, "seed": 0, "checkpoint": "best"}
KEYS = (*DEFAULTS, "data_dir")


def _number(key: str, value: str, kind: type, low: float | None) -> Any:
    try:
        number = kind(value)
    except ValueError:
        raise UserError(f"{key}={value!r} is not {'a whole number' if kind is int else 'a number'}; {USAGE}") from None
    if low is not None and not number > low:
        raise UserError(f"{key}={value} must be greater than {low:g}")
    return number


def parse_args(argv: list[str]) -> tuple[Path, dict[str, Any]]:
    """(run dir, settings: DEFAULTS with the arguments given, data_dir if given); UserError on the first bad one."""
    if not argv or ("=" in argv[0] and not Path(argv[0]).is_dir()) or argv[0].startswith("-"):  # job dirs hold "="
        raise UserError(f"give the run directory first; {USAGE}")
    settings = dict(DEFAULTS)
    for arg in argv[1:]:
        key, sep, value = arg.partition("=")
        if not sep or key not in KEYS:
            raise UserError(f"bad argument {arg!r}: expected one of {', '.join(f'{k}=...' for k in KEYS)}; {USAGE}")
        if key == "prompt":
            value = value.replace("\\n", "\n").replace("\\t", "\t")
            if not value:
                raise UserError("prompt= is empty; give at least one character (the default is a newline)")
        elif key == "checkpoint" and value not in ("best", "last"):
            raise UserError(f"checkpoint={value!r} is not allowed; allowed: best, last")
        elif key in ("length", "seed"):
            value = _number(key, value, int, 0 if key == "length" else None)
        elif key == "temperature":
            value = _number(key, value, float, 0.0)
        settings[key] = value
    return Path(argv[0]), settings


@torch.no_grad()
def generate(model: torch.nn.Module, task: Any, prompt: bytes, length: int, temperature: float, seed: int) -> bytes:
    """`length` characters drawn after `prompt`, read on the clock's grid (module docstring)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    ids = task.encode(prompt).tolist()
    state, start, drawn = None, 0, []  # the state where the current window starts, at ids[start]
    while True:
        while len(ids) - start > task.seq_len:  # a whole window behind the last character: carry past it
            _, state = model.forward_carried(_one_hot(ids[start:start + task.seq_len], task), state)
            start += task.seq_len
        if len(drawn) == length:
            return task.decode(torch.tensor(drawn))
        logits, _ = model.forward_carried(_one_hot(ids[start:], task), state)
        logits = logits[0, -1] / temperature
        logits[task.unk] = -torch.inf
        drawn.append(int(torch.multinomial(F.softmax(logits.double(), dim=0), 1, generator=generator)))
        ids.append(drawn[-1])


def _one_hot(ids: list[int], task: Any) -> torch.Tensor:
    return F.one_hot(torch.tensor([ids]), task.vocab_size).float()


def sample_run(run_dir: Path, settings: dict[str, Any]) -> tuple[str, Path]:
    """The prompt and its continuation from the run's checkpoint, and the file it was saved to."""
    from hrnn.cli.eval import load_run

    overrides = {"data_dir": settings["data_dir"]} if "data_dir" in settings else {}
    cfg, task, model, state = load_run(run_dir, settings["checkpoint"], overrides)
    if not task.streams:
        raise UserError(f"{run_dir} is a task={cfg.task.name} run; hrnn-sample writes text from a task=text run")
    prompt = settings["prompt"].encode("utf-8")
    text = prompt + generate(model, task, prompt, settings["length"], settings["temperature"], settings["seed"])
    name = f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{settings['checkpoint']}_seed{settings['seed']}.txt"
    out = run_dir / "samples" / name
    out.parent.mkdir(exist_ok=True)
    out.write_bytes(text)
    record = {**settings, "step": state["step"], "file": out.name}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return text.decode("utf-8", errors="replace"), out


@user_errors
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(f"{USAGE}\nWrites text with a task=text run's model; saves it in <run dir>/samples/.")
        return 0
    run_dir, settings = parse_args(argv)
    text, out = sample_run(run_dir, settings)
    print(text)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
