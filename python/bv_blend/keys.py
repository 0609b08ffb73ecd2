"""History keys: a dense int64 id per prompt (or per value of a dataset column), the unit a keyed
BV-Blend estimator keeps its own history for.

Ids are built once from the whole training dataset, in order of first appearance, so they depend
only on the dataset: every process builds the same ids, and a resumed run rebuilds the ids its
checkpoint was trained with. The names (one per id) are saved with the checkpoint, so a resume
on a dataset whose ids differ is refused rather than blending each prompt with another's history.
"""

from __future__ import annotations

import json
from collections.abc import Iterable


def parse_key(spec: str, setting: str = "bv_key") -> str | None:
    """The dataset column whose values are the keys, or None for no keys. `spec` is "none",
    "prompt" (one key per distinct prompt, the same as "column:prompt") or "column:NAME"."""
    if spec == "none":
        return None
    if spec == "prompt":
        return "prompt"
    if spec.startswith("column:") and spec[len("column:"):].strip():
        return spec[len("column:"):]
    raise ValueError(f"{setting} must be 'none', 'prompt' or 'column:NAME' (NAME a dataset "
                     f"column), got {spec!r}")


def key_name(value) -> str:
    """A canonical string for a column value: equal JSON values give equal names, and values of
    different types stay apart (1 vs "1"). Conversational prompts (lists of messages) work too."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=repr)


class KeyMap:
    """Names (canonical column values) and their dense ids 0..num_keys-1."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.ids = {name: i for i, name in enumerate(self.names)}

    @classmethod
    def from_values(cls, values: Iterable) -> "KeyMap":
        """Ids in order of first appearance of each distinct value."""
        return cls(list(dict.fromkeys(key_name(v) for v in values)))

    @property
    def num_keys(self) -> int:
        return len(self.names)

    def id_of(self, value) -> int:
        return self.ids[key_name(value)]

    def check_matches(self, saved: list[str], where: str) -> None:
        """Raise ValueError unless `saved` (names from a checkpoint) are these names, id by id."""
        if saved == self.names:
            return
        if len(saved) != len(self.names):
            problem = f"{len(saved)} keys were saved and this dataset gives {len(self.names)}"
        else:
            k = next(i for i, (a, b) in enumerate(zip(saved, self.names)) if a != b)
            problem = f"key id {k} was {_short(saved[k])} and is now {_short(self.names[k])}"
        raise ValueError(f"{where} was trained with other history keys than this dataset gives "
                         f"({problem}); resume with the dataset and key setting it was trained on")


def _short(name: str, limit: int = 60) -> str:
    return name if len(name) <= limit else name[:limit - 3] + "..."
