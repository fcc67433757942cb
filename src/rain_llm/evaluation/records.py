"""The shapes that flow through `rain eval` and `rain report`.

An evaluation reads `Example`s from a task's data, answers each with one or more methods, judges
each answer, and appends one `Record` per (example, method) to a JSON-lines file as soon as it is
done. `rain report` reads those files back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rain_llm.errors import RainError

TASKS = ("hh", "advbench", "truthfulqa", "xstest", "selfeval", "sentiment")


@dataclass
class Example:
    """One prompt of a task. `meta` holds the task's own fields (labels, reference answers...)."""

    id: str
    prompt: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Record:
    """One answered and judged example. Scores are floats in [0, 1] (booleans as 0/1) unless a
    task documents otherwise; `judges` names every judge used and the prompt it was given."""

    task: str
    id: str
    method: str
    prompt: str
    response: str
    scores: dict[str, float | None]
    judges: dict[str, Any]
    model: str = ""
    seed: int = 0
    seconds: float = 0.0
    answer_tokens: int = 0
    compute: dict[str, Any] = field(default_factory=dict)  # the engine's counters, as in Generation.stats
    method_config: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    error: str = ""  # why this answer failed (alone): no scores; a rerun answers it again

    def to_json(self) -> str:
        data = asdict(self)
        if not self.error:
            del data["error"]
        return json.dumps(data, ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: Any) -> Record:
        if not isinstance(d, dict):
            raise RainError("not a rain eval record (not a JSON object)")
        known = {f: d[f] for f in cls.__dataclass_fields__ if f in d}
        missing = [f for f in ("task", "id", "method", "scores") if f not in d]
        if missing:
            raise RainError(f"not a rain eval record (missing {', '.join(missing)})")
        known.setdefault("prompt", "")
        known.setdefault("response", "")
        known.setdefault("judges", {})
        return cls(**known)


def read_records(path: str | Path, *, failed: bool = False) -> list[Record]:
    """The answered records of a results file (with `failed`, also those of answers that failed);
    a clear error for a file that is not one."""
    path = Path(path)
    if path.is_dir():
        raise RainError(f"{path} is a folder, not a results file")
    if not path.is_file():
        raise RainError(f"results file not found: {path}")
    out = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = Record.from_dict(json.loads(line))
                if failed or not record.error:
                    out.append(record)
            except json.JSONDecodeError:
                if n > 1 and not line.endswith("\n"):
                    break  # a line cut off by a crash: everything before it stands
                raise RainError(f"{path}:{n} is not JSON: not a rain eval results file") from None
            except RainError as err:
                raise RainError(f"{path}:{n}: {err}") from None
    return out
