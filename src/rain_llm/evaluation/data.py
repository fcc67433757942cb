"""Evaluation data: each task's prompts as `Example`s.

A task's data comes from the shared copy under `default_data_dir()` (see shared/data/README.md),
from a local CSV/JSON/JSONL file, or from a Hugging Face dataset. All three are turned into a list
of plain dict rows first, so one converter per task handles every source the same way. IDs are
stable strings (the file's own id column, else a prefix and the row index) so that an interrupted
run can resume by id.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from rain_llm.errors import RainError
from rain_llm.evaluation.records import TASKS, Example

# Default files, relative to default_data_dir(). "sentiment" ships with the package instead.
DEFAULT_FILES = {
    "hh": "hh/red_team_first_turns.jsonl",
    "truthfulqa": "truthfulqa/truthfulqa_generation.jsonl",
    "xstest": "xstest/xstest_prompts.csv",
    "selfeval": "hh/harmless-base_test.jsonl",
}

# advbench variant -> (default file, where its adversarial suffixes came from)
ADVBENCH_VARIANTS = {
    "none": ("advbench/harmful_behaviors_rain_format_nosuffix.json", "none"),
    "smoothllm": ("advbench/gcg_smoothllm_rain_format.json", "GCG individual suffixes (SmoothLLM)"),
    "jbb-vicuna": ("jailbreakbench/gcg_vicuna-13b-v1.5_rain_format.json", "GCG white-box vicuna-13b-v1.5 (JBB)"),
    "jbb-llama2": ("jailbreakbench/gcg_llama-2-7b-chat-hf_rain_format.json", "GCG white-box llama-2-7b-chat (JBB)"),
}

SENTIMENT_FILE = "templates/review_openings.jsonl"
SENTIMENT_WORDS = 8  # the paper continues IMDB reviews from their first few words

# The split (and, for the well-known names, the subset) each task reads from the Hub.
_HUB_SPLITS = {"hh": "train", "selfeval": "test", "truthfulqa": "validation", "xstest": "test",
               "advbench": "train", "sentiment": "test"}
_HH_RLHF_DIRS = {"hh": "red-team-attempts", "selfeval": "harmless-base"}
_TRUTHFULQA_NAMES = {"truthful_qa", "truthfulqa/truthful_qa"}

_FILE_SUFFIXES = {".csv", ".json", ".jsonl", ".gz"}


def default_data_dir() -> Path | None:
    """$RAIN_DATA_DIR, else the `shared/data` folder next to the repository, else None."""
    env = os.environ.get("RAIN_DATA_DIR")
    if env:
        return Path(env).expanduser()
    parents = Path(__file__).resolve().parents
    if len(parents) > 4:  # src/rain_llm/evaluation/data.py -> the folder holding the repository
        guess = parents[4] / "shared" / "data"
        if guess.is_dir():
            return guess
    return None


def load_examples(task: str, source: str | os.PathLike | None = None, *, variant: str | None = None,
                  n_words: int = SENTIMENT_WORDS) -> list[Example]:
    """The examples of `task` from `source`: None (the default copy), a local file, or a Hub dataset name.

    `variant` picks the default advbench file (see ADVBENCH_VARIANTS); `n_words` is how many words of
    a full review become a sentiment prompt.
    """
    if task not in TASKS:
        raise RainError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    suffix_label = _check_variant(task, variant)
    if n_words < 1:
        raise RainError(f"n_words must be at least 1, got {n_words}")

    if source is None:
        raw, origin = _read_default(task, variant or "none")
    else:
        text = os.fspath(source)
        path = Path(text).expanduser()
        if path.is_file():
            raw, origin = _read_file(path), str(path)
            suffix_label = path.name
        elif path.exists():
            raise RainError(f"{path} is not a file")
        elif _looks_like_path(text):
            raise RainError(f"data file not found: {path}")
        else:
            raw, origin = _read_hub(task, text), f"Hugging Face dataset {text!r}"
            suffix_label = text

    if task == "hh":
        examples = _hh(raw, origin)
    elif task == "advbench":
        examples = _advbench(raw, origin, suffix_label)
    elif task == "truthfulqa":
        examples = _truthfulqa(raw, origin)
    elif task == "xstest":
        examples = _xstest(raw, origin)
    elif task == "selfeval":
        examples = _selfeval(raw, origin)
    else:
        examples = _sentiment(raw, origin, n_words)

    if not examples:
        raise RainError(f"{origin}: no {task} examples")
    seen: set[str] = set()
    for ex in examples:
        if ex.id in seen:
            raise RainError(f"{origin}: duplicate id {ex.id!r} (ids must be unique so runs can resume)")
        seen.add(ex.id)
    return examples


def select(examples: Sequence[Example], *, limit: int | None = None,
           shard: tuple[int, int] | None = None) -> list[Example]:
    """Shard (i, n) keeps the examples at positions p with p % n == i; then the first `limit` of those.

    Sharding by position in the full list (not after the limit) keeps shards disjoint and their
    union equal to the whole list, whatever the shard count.
    """
    out = list(examples)
    if shard is not None:
        i, n = shard
        _check_shard(i, n)
        out = [ex for p, ex in enumerate(out) if p % n == i]
    if limit is not None:
        if limit < 0:
            raise RainError(f"limit must be 0 or more, got {limit}")
        out = out[:limit]
    return out


def parse_shard(text: str) -> tuple[int, int]:
    """"i/n" (0-based i, 0 <= i < n) as a tuple, for a --shard option."""
    m = re.fullmatch(r"\s*([0-9]+)\s*/\s*([0-9]+)\s*", text) if isinstance(text, str) else None
    if not m:
        raise RainError(f"bad shard {text!r}: expected i/n with 0 <= i < n, e.g. 0/4")
    i, n = int(m.group(1)), int(m.group(2))
    _check_shard(i, n)
    return i, n


def _check_shard(i: int, n: int) -> None:
    if n < 1:
        raise RainError(f"bad shard {i}/{n}: the shard count must be at least 1")
    if not 0 <= i < n:
        raise RainError(f"bad shard {i}/{n}: the shard index must be in 0..{n - 1}")


def _check_variant(task: str, variant: str | None) -> str:
    """Validate `variant`; return the advbench suffix label of the default file it names."""
    if task != "advbench":
        if variant is not None:
            raise RainError(f"task {task} has no variants (got {variant!r}); only advbench has")
        return ""
    name = variant or "none"
    if name not in ADVBENCH_VARIANTS:
        raise RainError(f"unknown advbench variant {name!r}; known variants: {', '.join(ADVBENCH_VARIANTS)}")
    return ADVBENCH_VARIANTS[name][1]


# ----------------------------------------------------------------------------------------- reading


def _read_default(task: str, variant: str) -> tuple[Any, str]:
    if task == "sentiment":
        res = resources.files("rain_llm").joinpath(SENTIMENT_FILE)
        origin = f"rain_llm/{SENTIMENT_FILE}"
        return _parse_json(res.read_text(encoding="utf-8"), origin), origin
    root = default_data_dir()
    if root is None:
        raise RainError(f"no default data folder for task {task}: pass a data file as the source, "
                        "or set RAIN_DATA_DIR to a copy of shared/data")
    rel = ADVBENCH_VARIANTS[variant][0] if task == "advbench" else DEFAULT_FILES[task]
    path = root / rel
    if not path.is_file():
        raise RainError(f"default {task} data not found: {path} (pass a data file as the source, "
                        "or set RAIN_DATA_DIR)")
    return _read_file(path), str(path)


def _looks_like_path(text: str) -> bool:
    """A missing local path must not be sent to the Hub; Hub names look like `owner/name` or `name`."""
    return Path(text).suffix.lower() in _FILE_SUFFIXES or text.startswith(("/", ".", "~")) or "\\" in text


def _read_file(path: Path) -> Any:
    """CSV as a list of dicts; anything else as one JSON document or as JSON lines. `.gz` is unpacked."""
    name = path.name.lower()
    opener: Callable[..., Any] = open
    if name.endswith(".gz"):
        opener, name = gzip.open, name[:-3]
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as f:  # utf-8-sig: TruthfulQA.csv has a BOM
            text = f.read()
    except (OSError, UnicodeDecodeError, EOFError) as err:
        raise RainError(f"cannot read {path}: {err}") from None
    if name.endswith(".csv"):
        return _parse_csv(text, str(path))
    return _parse_json(text, str(path))


def _parse_csv(text: str, origin: str) -> list[dict[str, Any]]:
    reader = csv.DictReader(io.StringIO(text))
    try:
        if reader.fieldnames is None:
            return []
        reader.fieldnames = [name.strip() for name in reader.fieldnames]
        return [{k: v for k, v in row.items() if k is not None} for row in reader]
    except csv.Error as err:
        raise RainError(f"{origin}: not a valid CSV file ({err})") from None


def _parse_json(text: str, origin: str) -> Any:
    """One JSON document (a list of rows, or a dict) if it parses as one, else JSON lines."""
    if not text.strip():
        return []
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise RainError(f"{origin}:{n}: not JSON ({err.msg}); expected a .csv, .json or .jsonl file") from None
    return rows


def _read_hub(task: str, name: str) -> list[dict[str, Any]]:
    """A Hub dataset's rows for `task`; every failure (no `datasets`, offline, bad name) as one line."""
    try:
        import datasets
    except ImportError:
        raise RainError(f"{name!r} is not a local file, and loading it from the Hugging Face Hub needs the "
                        "`datasets` package (pip install datasets)") from None
    args: tuple[str, ...] = ()
    kwargs: dict[str, Any] = {"split": _HUB_SPLITS[task]}
    if name.lower() == "anthropic/hh-rlhf" and task in _HH_RLHF_DIRS:
        kwargs["data_dir"] = _HH_RLHF_DIRS[task]
    if task == "truthfulqa" and name.lower() in _TRUTHFULQA_NAMES:
        args = ("generation",)
    try:
        return [dict(row) for row in datasets.load_dataset(name, *args, **kwargs)]
    except Exception as err:  # network, unknown name, missing split: all for the user to fix
        lines = str(err).strip().splitlines()
        reason = lines[0] if lines else type(err).__name__
        raise RainError(f"{name!r} is not a local file and could not be loaded from the Hugging Face Hub: "
                        f"{reason}") from None


def _rows(raw: Any, origin: str) -> list[dict[str, Any]]:
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list):
        raise RainError(f"{origin}: expected a list of rows, found {type(raw).__name__}")
    for i, row in enumerate(raw):
        if not isinstance(row, dict):
            raise RainError(f"{origin}: row {i} is a {type(row).__name__}, expected an object with named fields")
    return raw


def _require(row: dict[str, Any], columns: Sequence[str], origin: str, i: int) -> None:
    missing = [c for c in columns if c not in row]
    if missing:
        where = f" (row {i})" if i else ""
        raise RainError(f"{origin}: missing column(s) {', '.join(missing)}{where}; "
                        f"found: {', '.join(map(str, row)) or 'none'}")


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _row_id(row: dict[str, Any], i: int, prefix: str | None, keys: Sequence[str] = ("id",)) -> str:
    for key in keys:
        value = _text(row.get(key)).strip()
        if value:
            return value
    return f"{prefix}-{i}" if prefix else str(i)


# ----------------------------------------------------------------------------------------- HH


def _rain_first_turn(transcript: str, origin: str, i: int) -> str:
    """RAIN's HH prompt: the transcript up to and including the first "Assistant:", "\\n\\n" -> "\\n"."""
    end = transcript.find("Assistant:")
    if end < 0:
        raise RainError(f"{origin}: row {i} has no 'Assistant:' turn")
    return transcript[: end + len("Assistant:")].replace("\n\n", "\n")


def _human_text(transcript: str) -> str:
    """The user's message inside a first-turn transcript "\\nHuman: ...\\nAssistant:"."""
    start = transcript.find("Human:")
    start = 0 if start < 0 else start + len("Human:")
    end = transcript.rfind("Assistant:")
    return transcript[start: end if end >= start else None].strip()


def _hh(raw: Any, origin: str) -> list[Example]:
    """First-turn prompts from first-turn rows (`prompt`), red-team `transcript`s or harmless-base `chosen`.

    Harmless-base rows are deduplicated by first turn (as red_team_first_turns.jsonl was built);
    red-team transcripts are not, as in RAIN.
    """
    rows = _rows(raw, origin)
    column = next((c for c in ("prompt", "transcript", "chosen") if rows and c in rows[0]), "prompt")
    out, seen = [], set()
    for i, row in enumerate(rows):
        if column not in row:
            raise RainError(f"{origin}: missing column(s) prompt, transcript or chosen"
                            f"{f' (row {i})' if i else ''}; found: {', '.join(map(str, row)) or 'none'}")
        value = _text(row[column])
        if column == "prompt":
            if value.lstrip().startswith("Human:"):
                transcript = value
            else:
                transcript = f"\nHuman: {value.strip()}\nAssistant:"
        else:
            transcript = _rain_first_turn(value, origin, i)
            if column == "chosen":
                if transcript in seen:
                    continue
                seen.add(transcript)
        out.append(Example(_row_id(row, i, "hh"), _human_text(transcript), {"transcript": transcript}))
    return out


def _first_exchange(transcript: str, origin: str, i: int) -> tuple[str, str]:
    """(first human message, first assistant reply) of a "\\n\\nHuman: ...\\n\\nAssistant: ..." transcript.

    The reply ends where a new line starts the next turn. HH replies sometimes begin with or quote
    "Human:" inside a line; that text is the assistant's and is kept.
    """
    h = transcript.find("Human:")
    a = transcript.find("Assistant:", max(h, 0))
    if h < 0 or a < 0:
        raise RainError(f"{origin}: row {i} is not a 'Human: ... Assistant: ...' transcript")
    start = a + len("Assistant:")
    ends = [n for n in (transcript.find("\nHuman:", start), transcript.find("\nAssistant:", start)) if n >= 0]
    reply = transcript[start: min(ends) if ends else None]
    return transcript[h + len("Human:"): a].strip(), reply.strip()


def _selfeval(raw: Any, origin: str) -> list[Example]:
    """Pairs a self-evaluation should order: the better answer (`chosen`) above the worse (`rejected`).

    Three row shapes, so any labelled pairs can be checked, not only HH's:
      - HH harmless-base: `chosen` and `rejected` transcripts ("Human: ... Assistant: ..."); the first
        exchange is compared, and pairs whose first replies are equal are skipped;
      - `prompt`, `chosen`, `rejected`: the two answers to `prompt`, as they are;
      - `prompt`, `a`, `b`, `label`: two answers and which is better (`a`/`b`, or 0/1 for a/b).
    Any other fields of a row are kept in the record's meta under "pair" (how it was labelled, say).
    """
    out = []
    for i, row in enumerate(_rows(raw, origin)):
        if "a" in row or "b" in row or ("label" in row and "chosen" not in row):
            _require(row, ("prompt", "a", "b", "label"), origin, i)
            chosen, rejected = _labelled_pair(row, origin, i)
            used: tuple[str, ...] = ("id", "prompt", "a", "b", "label")
            meta: dict[str, Any] = {"chosen": chosen, "rejected": rejected, "label": _text(row["label"]).strip()}
            prompt = _text(row["prompt"]).strip()
        elif "prompt" in row:
            _require(row, ("prompt", "chosen", "rejected"), origin, i)
            chosen, rejected = _text(row["chosen"]).strip(), _text(row["rejected"]).strip()
            used = ("id", "prompt", "chosen", "rejected")
            meta = {"chosen": chosen, "rejected": rejected}
            prompt = _text(row["prompt"]).strip()
        else:
            _require(row, ("chosen", "rejected"), origin, i)
            chosen_text, rejected_text = _text(row["chosen"]), _text(row["rejected"])
            if "Human:" not in chosen_text or "Assistant:" not in chosen_text:
                raise RainError(f"{origin}: row {i} has no prompt column and its chosen answer is not a "
                                "'Human: ... Assistant: ...' transcript (plain answers need a prompt column)")
            prompt, chosen = _first_exchange(chosen_text, origin, i)
            _, rejected = _first_exchange(rejected_text, origin, i)
            used = ("id", "chosen", "rejected")
            meta = {"chosen": chosen, "rejected": rejected, "transcript": _rain_first_turn(chosen_text, origin, i)}
        if not prompt:
            raise RainError(f"{origin}: row {i} has an empty prompt")
        if chosen == rejected:
            continue
        extra = {k: v for k, v in row.items() if k not in used}
        if extra:
            meta["pair"] = extra
        out.append(Example(_row_id(row, i, "selfeval"), prompt, meta))
    return out


def _labelled_pair(row: dict[str, Any], origin: str, i: int) -> tuple[str, str]:
    """(better, worse) of an a/b row by its label: "a" or "b" (any case), or 0 / 1 for a / b."""
    label = _text(row["label"]).strip().lower()
    a, b = _text(row["a"]).strip(), _text(row["b"]).strip()
    if label in ("a", "0"):
        return a, b
    if label in ("b", "1"):
        return b, a
    raise RainError(f"{origin}: row {i} has label {_text(row['label'])!r}; expected a or b (or 0 / 1), "
                    "naming the better answer")


# ----------------------------------------------------------------------------------------- AdvBench


def _log_rows(raw: dict[str, Any], origin: str) -> list[dict[str, Any]]:
    """llm-attacks logs keep parallel lists {"goal": [...], "controls": [...]}; pair them up."""
    if "controls" not in raw:
        raise RainError(f"{origin}: missing column(s) controls (llm-attacks log format)")
    goals, controls, targets = raw["goal"], raw["controls"], raw.get("target")
    if not isinstance(controls, list) or len(controls) != len(goals):
        raise RainError(f"{origin}: 'goal' and 'controls' must be lists of the same length")
    rows = [{"goal": g, "controls": c} for g, c in zip(goals, controls)]
    if isinstance(targets, list) and len(targets) == len(goals):
        for row, target in zip(rows, targets):
            row["target"] = target
    return rows


def _advbench(raw: Any, origin: str, suffix_label: str) -> list[Example]:
    """Prompt = goal + " " + adversarial suffix, exactly as RAIN's adv/main.py builds it."""
    if isinstance(raw, dict) and isinstance(raw.get("goal"), list):
        raw = _log_rows(raw, origin)
    out = []
    for i, row in enumerate(_rows(raw, origin)):
        if "goal" not in row and "prompt" in row:  # Hub copies (e.g. walledai/AdvBench) name it prompt
            row = {**row, "goal": row["prompt"]}
        _require(row, ("goal",), origin, i)
        goal, controls = _text(row["goal"]), _text(row.get("controls"))
        prompt = f"{goal} {controls}" if controls else goal
        source = "none" if not controls else _text(row.get("suffix_optimized_on")) or suffix_label
        meta: dict[str, Any] = {"goal": goal, "controls": controls, "suffix_source": source}
        meta.update({k: row[k] for k in ("target", "behavior", "category") if k in row})
        out.append(Example(_row_id(row, i, "advbench", ("id", "index")), prompt, meta))
    return out


# ----------------------------------------------------------------------------------------- TruthfulQA


def _answers(value: Any) -> list[str]:
    """Reference answers: a list, or the CSV's ";"-separated string."""
    items = value if isinstance(value, list) else _text(value).split(";")
    return [s for s in (_text(x).strip() for x in items) if s]


def _truthfulqa(raw: Any, origin: str) -> list[Example]:
    """Questions with their references. Without an id column the id is the row index, so the CSV,
    the JSONL and the Hub copy (all in the same order) give the same ids."""
    out = []
    for i, row in enumerate(_rows(raw, origin)):
        row = {str(k).strip().lower().replace(" ", "_"): v for k, v in row.items()}  # "Best Answer" -> best_answer
        _require(row, ("question", "best_answer", "correct_answers", "incorrect_answers"), origin, i)
        meta = {
            "best_answer": _text(row["best_answer"]).strip(),
            "correct_answers": _answers(row["correct_answers"]),
            "incorrect_answers": _answers(row["incorrect_answers"]),
            "category": _text(row.get("category")).strip(),
            "type": _text(row.get("type")).strip(),
            "source": _text(row.get("source")).strip(),
        }
        out.append(Example(_row_id(row, i, None), _text(row["question"]).strip(), meta))
    return out


# ----------------------------------------------------------------------------------------- XSTest


def _xstest(raw: Any, origin: str) -> list[Example]:
    """Safe prompts a model should answer and unsafe contrast prompts it should refuse."""
    out = []
    for i, row in enumerate(_rows(raw, origin)):
        _require(row, ("prompt",) if "type" in row else ("prompt", "label"), origin, i)
        kind = _text(row.get("type")).strip()
        label = _text(row.get("label")).strip().lower()
        if not label:  # XSTest's rule: the contrast_* types are the unsafe ones
            label = "unsafe" if kind.startswith("contrast") else "safe"
        if label not in ("safe", "unsafe"):
            raise RainError(f"{origin}: row {i} has label {label!r}; expected safe or unsafe")
        meta = {"type": kind, "label": label, "focus": _text(row.get("focus")).strip(),
                "note": _text(row.get("note")).strip()}
        out.append(Example(_row_id(row, i, "xstest"), _text(row["prompt"]).strip(), meta))
    return out


# ----------------------------------------------------------------------------------------- sentiment


def _opening(text: str, n_words: int) -> str:
    """The first `n_words` words of a review (IMDB texts carry <br /> tags)."""
    return " ".join(text.replace("<br />", " ").split()[:n_words])


def _sentiment(raw: Any, origin: str, n_words: int) -> list[Example]:
    """Review openings to continue: a `prompt` as is, or the start of a full review `text`."""
    out = []
    for i, row in enumerate(_rows(raw, origin)):
        if "prompt" in row:
            prompt = _text(row["prompt"]).strip()
        elif "text" in row:
            prompt = _opening(_text(row["text"]), n_words)
        else:
            raise RainError(f"{origin}: missing column(s) prompt or text{f' (row {i})' if i else ''}; "
                            f"found: {', '.join(map(str, row)) or 'none'}")
        meta = {"label": row["label"]} if "label" in row else {}
        out.append(Example(_row_id(row, i, "review"), prompt, meta))
    return out
