"""Built-in verifiable tasks and the JSONL loader.

Every procedural task is an endless, deterministic stream: example `i` is generated from
`(seed, i)` alone, so "where we are in the data" is one integer and a resumed run sees exactly the
prompts it would have seen. A JSONL file is a finite list walked in a seeded order that is
reshuffled every epoch, again a pure function of the position; `num_prompts` turns a procedural
task into such a list (its first N examples), so that prompts come back epoch after epoch, as
per-prompt history needs.

Prompts are plain text (no chat template): the tiny character-level model reads and writes
characters, and the answers are short digit strings it can learn to produce on a CPU in minutes.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Callable

from bv_blend import rewards



@dataclass(frozen=True)
class Task:
    name: str
    description: str
    make_example: Callable[[random.Random], dict] | None  # None: examples come from a file
    reward_funcs: tuple[Callable, ...]
    max_completion_length: int  # enough tokens for the longest answer plus EOS


def _addition(rng: random.Random) -> dict:
    a, b = rng.randrange(10), rng.randrange(10)
    return {"prompt": f"{a}+{b}=", "answer": f"{a + b:02d}"}


def _reversal(rng: random.Random) -> dict:
    digits = "".join(rng.choice(rewards.DIGITS) for _ in range(3))
    return {"prompt": f"rev {digits}:", "answer": digits[::-1]}


TASKS: dict[str, Task] = {
    task.name: task for task in (
        Task("add", "single-digit addition, two-digit answer '3+5=' -> '08'; partial credit "
             "per character", _addition, (rewards.digit_partial_credit,), 3),
        Task("add_sparse", "single-digit addition; reward 1 only for the exact answer",
             _addition, (rewards.exact_match,), 3),
        Task("reverse", "reverse three digits 'rev 123:' -> '321'; partial credit per character",
             _reversal, (rewards.digit_partial_credit,), 5),
        Task("reverse_sparse", "reverse three digits; reward 1 only for the exact answer",
             _reversal, (rewards.exact_match,), 5),
        Task("jsonl", "your own JSONL file (dataset_path) with 'prompt' and 'answer' columns; "
             "exact-match reward unless reward_funcs says otherwise",
             None, (rewards.exact_match,), 16),
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name]


class ProceduralPrompts:
    """Example i of a procedural task, generated from (seed, i): random access, no storage."""

    def __init__(self, make_example: Callable[[random.Random], dict], seed: int):
        self.make_example = make_example
        self.seed = seed

    def __getitem__(self, position: int) -> dict:
        # A string seed is hashed deterministically by random.Random (unlike hash() of a tuple).
        return self.make_example(random.Random(f"{self.seed}:{position}"))


class ShuffledRecords:
    """A finite dataset read in a seeded order that is reshuffled every epoch."""

    def __init__(self, records, seed: int):
        self.records = records
        self.seed = seed
        self._order_epoch, self._order = None, None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, position: int) -> dict:
        return dict(self.records[self.index(position)])

    def index(self, position: int) -> int:
        """The record read at `position` of the stream."""
        epoch, offset = divmod(position, len(self.records))
        if epoch != self._order_epoch:
            self._order = list(range(len(self.records)))
            random.Random(f"{self.seed}:epoch{epoch}").shuffle(self._order)
            self._order_epoch = epoch
        return self._order[offset]


_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def load_jsonl(path: str) -> list[dict]:
    """A JSONL file: one JSON object per line with at least 'prompt' and 'answer' columns (blank
    lines are skipped). Errors name the file and the line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset_path {path!r} is not a file")
    with open(path, encoding="utf-8") as f:
        try:
            lines = f.readlines()
        except UnicodeDecodeError as err:
            raise ValueError(f"dataset_path {path!r} is not UTF-8 text ({err.reason})") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"dataset_path {path!r} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where} is not valid JSON ({err.msg}); expected one JSON object "
                             f"per line") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where} is a JSON {_JSON_TYPES[type(record)]}, expected an object "
                             f"with 'prompt' and 'answer'")
        missing = {"prompt", "answer"} - set(record)
        if missing:
            raise ValueError(f"{where} lacks the column(s) {sorted(missing)}; it has "
                             f"{sorted(record)}")
        records.append(record)
    if not records:
        raise ValueError(f"dataset_path {path!r} holds no records")
    return records


def prompt_source(task: Task, seed: int, dataset=None, num_prompts: int | None = None):
    """Random-access examples for `task`: `dataset` (a datasets.Dataset or a list of dicts with a
    'prompt' column) when given, otherwise the task's own generator: endless, or with
    `num_prompts` its first `num_prompts` examples as a finite dataset, revisited every epoch."""
    if dataset is not None:
        if num_prompts is not None:
            raise ValueError("num_prompts applies to the procedural tasks, not to a given dataset")
        if len(dataset) == 0:
            raise ValueError("train_dataset holds no records")
        if "prompt" not in dataset[0]:
            raise ValueError(f"train_dataset needs a 'prompt' column; it has {list(dataset[0])}")
        return ShuffledRecords(dataset, seed)
    if task.make_example is None:
        raise ValueError(f"task {task.name!r} reads its examples from a file: set dataset_path")
    generated = ProceduralPrompts(task.make_example, seed)
    if num_prompts is None:
        return generated
    return ShuffledRecords([generated[i] for i in range(num_prompts)], seed)
