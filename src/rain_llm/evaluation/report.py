"""`rain report`: tables, a CSV and plots from one or more `rain eval` results files.

Every number is a mean over answers with a 95% interval, because the evaluation sets are small
enough that two methods a few points apart are often not different at all. Scores that are all
0/1 get a Wilson score interval (it stays inside [0, 1] and is sensible at 0 of n); other scores
get mean ± 1.96·sd/√n, clipped to [0, 1] when every value is a rate.

The same (task, id, method) can appear in several files (a resumed or re-run evaluation); the
last one read wins and is counted once.
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rain_llm.errors import RainError
from rain_llm.evaluation.records import Record, read_records

Z = 1.96  # two-sided 95%

# Readable column names for the score keys tasks write; any other key is shown as itself.
LABELS = {
    "harmless": "harmless",
    "harmful": "harmful",
    "jailbroken": "ASR (attack success)",
    "refused": "refusal rate",
    "helpful": "helpful",
    "truthful": "truthful",
    "informative": "informative",
    "positive": "positive",
    "over_refusal": "over-refusal",
    "unsafe_compliance": "unsafe compliance",
    "refused_lm": "refusal rate (LM judge)",
    "over_refusal_lm": "over-refusal (LM judge)",
    "unsafe_compliance_lm": "unsafe compliance (LM judge)",
    "win_harmless_vs_vanilla": "harmless win rate vs vanilla",
    "win_helpful_vs_vanilla": "helpful win rate vs vanilla",
    "positive_both": "positive (VADER and AFINN)",
    "positive_vader": "positive (VADER)",
    "positive_afinn": "positive (AFINN)",
    "lexicons_agree": "lexicons agree",
}

# (score key, plotted as 1 - score, axis label), first match wins.
HARMLESSNESS = (("harmless", False, "harmless"), ("harmful", True, "1 - harmful"), ("jailbroken", True, "1 - ASR"))
# Against compute, each score as it is usually quoted: attack success itself, not 1 - ASR.
MAIN_SCORES = (("harmless", False, "harmless"), ("harmful", False, "harmful"),
               ("jailbroken", False, "attack success rate (ASR)"), ("truthful", False, "truthful"),
               ("positive", False, "positive"), ("positive_both", False, "positive (both lexicons)"),
               ("accuracy", False, "accuracy"))
# 0/1 scores paired with vanilla besides the main one: each judge of a task judged by several
PAIRED_ALSO = ("positive_vader", "positive_afinn")

PLOTS = ("harmless_vs_helpful.png", "score_vs_compute.png")


# ---------------------------------------------------------------- intervals


def ci_proportion(k: float, n: int) -> tuple[float, float]:
    """Wilson score 95% interval for k successes out of n."""
    if n <= 0:
        raise ValueError("n must be positive")
    p = k / n
    denom = 1 + Z * Z / n
    centre = (p + Z * Z / (2 * n)) / denom
    half = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def ci_mean(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) with the normal 95% interval; the bounds are NaN for a single value."""
    if not values:
        raise ValueError("no values")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = Z * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


@dataclass
class Estimate:
    """A mean with its 95% interval and how it was computed ("wilson" or "normal")."""

    n: int
    mean: float
    lower: float
    upper: float
    interval: str

    def flipped(self) -> Estimate:
        """The estimate of 1 - x, for plotting "1 - ASR" next to "harmless"."""
        return Estimate(self.n, 1 - self.mean, 1 - self.upper, 1 - self.lower, self.interval)

    def as_dict(self) -> dict[str, Any]:
        return {"n": self.n, "mean": self.mean, "lower": self.lower, "upper": self.upper, "interval": self.interval}


def auc(positives: list[float], negatives: list[float]) -> Estimate:
    """Area under the ROC curve (Mann-Whitney, ties count half) with the Hanley-McNeil 95% interval."""
    n1, n2 = len(positives), len(negatives)
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in positives for q in negatives)
    a = wins / (n1 * n2)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = math.sqrt(max(0.0, a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n2 - 1) * (q2 - a * a)) / (n1 * n2))
    return Estimate(min(n1, n2), a, max(0.0, a - Z * se), min(1.0, a + Z * se), "hanley-mcneil")


def selfeval_aucs(recs: list[Record]) -> dict[str, Estimate]:
    """AUC of the good option's probability for chosen (positive) vs rejected (negative) answers, per
    option order and for their mean: can the model tell the two apart at all, whatever the threshold."""
    rows = [r.meta for r in recs if isinstance(r.meta.get("p_good_chosen"), list)
            and isinstance(r.meta.get("p_good_rejected"), list)]
    if not rows:
        return {}
    out = {}
    for key, pick in (("auc_good_first", lambda v: v[0]), ("auc_bad_first", lambda v: v[1]),
                      ("auc_mean", lambda v: (v[0] + v[1]) / 2)):
        out[key] = auc([pick(m["p_good_chosen"]) for m in rows], [pick(m["p_good_rejected"]) for m in rows])
    return out


def estimate_score(values: list[float]) -> Estimate:
    """Wilson for 0/1 scores, else the normal interval (clipped when every value is in [0, 1])."""
    n = len(values)
    if all(v in (0.0, 1.0) for v in values):
        k = sum(values)
        return Estimate(n, k / n, *ci_proportion(k, n), "wilson")
    mean, low, high = ci_mean(values)
    if all(0.0 <= v <= 1.0 for v in values) and not math.isnan(low):
        low, high = max(0.0, low), min(1.0, high)
    return Estimate(n, mean, low, high, "normal")


def estimate_quantity(values: list[float]) -> Estimate | None:
    """Seconds and token counts: the normal interval, never clipped; None when nothing was recorded."""
    if not values:
        return None
    return Estimate(len(values), *ci_mean(values), "normal")


# ---------------------------------------------------------------- reading and summarising


def task_label(rec: Record) -> str:
    """The table a record belongs to: its task, and for AdvBench its suffix variant, so that runs with
    and without adversarial suffixes (whose ids coincide) are never merged."""
    variant = rec.meta.get("variant") if isinstance(rec.meta, dict) else None
    if variant and variant != "none":
        return f"{rec.task}/{variant}"
    if rec.task == "advbench" and isinstance(rec.meta, dict) and rec.meta.get("controls"):
        return f"{rec.task}/suffixed"  # records written before the variant was recorded
    return rec.task


def template_of(rec: Record) -> str:
    """The self-evaluation template a record's answer (or verdict) used, '' when none was recorded."""
    config = rec.method_config.get("config") if isinstance(rec.method_config, dict) else None
    return str(config.get("template", "")) if isinstance(config, dict) else ""


def leaves_of(rec: Record) -> str:
    """"p4" for a search that expanded 4 leaves per round (`--parallel-leaves 4`), '' for the paper's one:
    the opt-in changes the search, so its answers are a row of their own, never duplicates of the other."""
    config = rec.method_config.get("config") if isinstance(rec.method_config, dict) else None
    leaves = config.get("parallel_leaves", 1) if isinstance(config, dict) and rec.method == "rain" else 1
    return f"p{leaves}" if isinstance(leaves, int) and leaves > 1 else ""


def load(paths: list[str | Path]) -> tuple[list[Record], int]:
    """The records of all files, one per (task label, id, method, model, template, parallel leaves) with
    the last read winning; also how many duplicates were dropped."""
    if not paths:
        raise RainError("no results files given")
    latest: dict[tuple[str, ...], Record] = {}
    read = 0
    for path in paths:
        for rec in read_records(path):
            check_record(rec, path)
            read += 1
            key = (task_label(rec), str(rec.id), rec.method, rec.model or "", template_of(rec), leaves_of(rec))
            latest.pop(key, None)  # re-insert so the order follows the winning copy
            latest[key] = rec
    if not latest:
        raise RainError(f"no records in {', '.join(str(p) for p in paths)}")
    return list(latest.values()), read - len(latest)


def check_record(rec: Record, path: str | Path) -> None:
    """Catch records whose scores cannot be averaged, with a line that says where."""
    if not isinstance(rec.scores, dict):
        raise RainError(f"{path}: record {rec.task}/{rec.id}/{rec.method} has scores that are not a mapping")
    for key, value in rec.scores.items():
        if value is not None and not isinstance(value, (int, float)):
            raise RainError(f"{path}: record {rec.task}/{rec.id}/{rec.method} has a non-numeric score {key}={value!r}")


def score_value(value: Any) -> float | None:
    """A score as a float; None and NaN both mean "not judged"."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def compute_total(rec: Record, what: str) -> float | None:
    """A total of the answer's recorded compute: "tokens" processed or "forward_passes" (None where
    unknown: a language-model phase with tokens but no forward passes ran on a server, which does not
    report them)."""
    if what == "forward_passes" and isinstance(rec.compute, dict) and any(
            isinstance(c, dict) and c.get("tokens") and not c.get("forward_passes")
            for name, c in rec.compute.items() if name not in ("total", "least_work", "embed")):
        return None
    total = rec.compute.get("total") if isinstance(rec.compute, dict) else None
    tokens = total.get(what) if isinstance(total, dict) else None
    return float(tokens) if isinstance(tokens, (int, float)) else None


@dataclass
class MethodSummary:
    """One table row: a method's estimates on one task."""

    n: int
    scores: dict[str, Estimate]
    seconds: Estimate | None
    answer_tokens: Estimate | None
    forward_tokens: Estimate | None
    forward_passes: Estimate | None = None

    def as_dict(self) -> dict[str, Any]:
        def opt(e: Estimate | None) -> dict[str, Any] | None:
            return e.as_dict() if e else None

        return {"n": self.n, "scores": {k: e.as_dict() for k, e in self.scores.items()},
                "seconds": opt(self.seconds), "answer_tokens": opt(self.answer_tokens),
                "forward_tokens": opt(self.forward_tokens), "forward_passes": opt(self.forward_passes)}


@dataclass
class TaskSummary:
    """All methods on one task, plus what is needed to say how it was judged."""

    score_keys: list[str]
    methods: dict[str, MethodSummary]
    judges: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    paired: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> changes against vanilla


def ordered_keys(keys: list[str]) -> list[str]:
    """Known scores in a fixed, readable order; unknown ones after them, as first seen."""
    known = [k for k in LABELS if k in keys]
    return known + [k for k in keys if k not in LABELS]


def summarise(records: list[Record]) -> dict[str, TaskSummary]:
    """Group by task (AdvBench by suffix variant) then method, both in order of first appearance, and
    estimate every column. Where a task holds results of several models or self-evaluation templates,
    each model's (template's) methods are rows of their own ("rain [model]", "selfeval [short.toml]")."""
    models: dict[str, set[str]] = {}
    templates: dict[str, set[str]] = {}
    for rec in records:
        models.setdefault(task_label(rec), set()).add(rec.model or "")
        if template_of(rec):
            templates.setdefault(task_label(rec), set()).add(template_of(rec))
    grouped: dict[str, dict[str, list[Record]]] = {}
    for rec in records:
        task = task_label(rec)
        row = f"{rec.method} [{rec.model}]" if len(models[task]) > 1 else rec.method
        if len(templates.get(task, ())) > 1 and template_of(rec):
            row += f" [{Path(template_of(rec)).name}]"
        if leaves_of(rec):
            row += f" [parallel leaves {leaves_of(rec)[1:]}]"
        grouped.setdefault(task, {}).setdefault(row, []).append(rec)
    out = {}
    for task, by_method in grouped.items():
        task_records = [r for recs in by_method.values() for r in recs]
        keys = ordered_keys(list(dict.fromkeys(k for r in task_records for k in r.scores)))
        methods = {}
        for method, recs in by_method.items():
            scores = {}
            for key in keys:
                values = [v for r in recs if (v := score_value(r.scores.get(key))) is not None]
                if values:
                    scores[key] = estimate_score(values)
            if recs[0].task == "selfeval":
                scores.update(selfeval_aucs(recs))
            tokens = [t for r in recs if (t := compute_total(r, "tokens")) is not None]
            passes = [t for r in recs if (t := compute_total(r, "forward_passes")) is not None]
            methods[method] = MethodSummary(
                n=len(recs), scores=scores,
                seconds=estimate_quantity([float(r.seconds) for r in recs]),
                answer_tokens=estimate_quantity([float(r.answer_tokens) for r in recs]),
                forward_tokens=estimate_quantity(tokens), forward_passes=estimate_quantity(passes))
        if task_records[0].task == "selfeval":
            keys = keys + [k for k in ("auc_good_first", "auc_bad_first", "auc_mean")
                           if any(k in m.scores for m in methods.values())]
        out[task] = TaskSummary(keys, methods, judge_names(task_records),
                                list(dict.fromkeys(r.model for r in task_records if r.model)),
                                paired_with_vanilla(by_method, [k for k in keys if any(
                                    k in m.scores for m in methods.values())]))  # judged somewhere
    return out


def mcnemar_exact(up: int, down: int) -> float:
    """Two-sided exact McNemar test: how likely so lopsided a split of the discordant pairs is
    if the method changed nothing (each change equally likely either way)."""
    n = up + down
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(up, down) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_with_vanilla(by_method: dict[str, list[Record]], keys: list[str]) -> dict[str, dict[str, Any]]:
    """Each method against vanilla on the same prompts: how many answers differ, and for the task's
    main 0/1 score how many went 0 -> 1 and 1 -> 0. Intervals of two arms overlap long before a paired
    difference is noise; these counts say what actually moved."""
    vanilla = {str(r.id): r for r in by_method.get("vanilla", [])}
    main = next((key for key, _, _ in MAIN_SCORES if key in keys), None)
    also = [key for key in PAIRED_ALSO if key in keys and key != main]
    out = {}
    for method, recs in by_method.items():
        pairs = [(vanilla[str(r.id)], r) for r in recs if method != "vanilla" and str(r.id) in vanilla]
        if not pairs:
            continue
        entry: dict[str, Any] = {"n": len(pairs), "differ": sum(a.response != b.response for a, b in pairs)}
        if main is not None:
            entry |= moved(pairs, main)
        if also:
            entry["also"] = [moved(pairs, key) for key in also]
        out[method] = entry
    return out


def moved(pairs: list[tuple[Record, Record]], key: str) -> dict[str, Any]:
    """How many (vanilla, method) pairs went 0 -> 1 and 1 -> 0 on a 0/1 score, with the exact McNemar p."""
    values = [(score_value(a.scores.get(key)), score_value(b.scores.get(key))) for a, b in pairs]
    both = [(x, y) for x, y in values if x is not None and y is not None and x in (0.0, 1.0) and y in (0.0, 1.0)]
    up, down = sum(x < y for x, y in both), sum(x > y for x, y in both)
    return {"score": key, "up": up, "down": down, "p_mcnemar": mcnemar_exact(up, down)}


def judge_names(records: list[Record]) -> list[str]:
    """Distinct judges as "key: name via model", so a table says how its numbers were scored.

    Values are judge identities (see judges.py: {"name", "backend": {"model", ...}, "prompt", ...}) or plain
    strings; a long string is taken to be the judge's prompt and only the key is shown."""
    names = []
    for rec in records:
        if not isinstance(rec.judges, dict):
            continue
        for key, value in rec.judges.items():
            name = describe_judge(value)
            names.append(f"{key}: {name}" if name and name != key else str(key))
    return list(dict.fromkeys(names))


def describe_judge(identity: Any) -> str | None:
    if isinstance(identity, str):
        return identity if "\n" not in identity and len(identity) <= 80 else None
    if not isinstance(identity, dict):
        return None
    name = next((identity[f] for f in ("name", "model", "judge", "id") if isinstance(identity.get(f), str)), None)
    backend = identity.get("backend")
    model = backend.get("model") if isinstance(backend, dict) else None
    if isinstance(model, str) and model != name:
        return f"{name} via {model}" if name else model
    return name


# ---------------------------------------------------------------- writing


def label(key: str) -> str:
    return LABELS.get(key, key)


def fmt_estimate(e: Estimate, row_n: int) -> str:
    if math.isnan(e.lower):
        text = f"{e.mean:.3f}"
    else:
        text = f"{e.mean:.3f} [{e.lower:.3f}, {e.upper:.3f}]"
    return text if e.n == row_n else f"{text} (n={e.n})"


def fmt_mean(e: Estimate | None, digits: int) -> str:
    return "–" if e is None else f"{e.mean:.{digits}f}"


def markdown(summary: dict[str, TaskSummary], sources: list[str], n_records: int, duplicates: int,
             plot_notes: list[str]) -> str:
    lines = ["# RAIN evaluation report", "",
             f"Sources: {', '.join(sources)} ({n_records} records"
             + (f", {duplicates} duplicates dropped, the last copy kept" if duplicates else "") + ").", "",
             "Scores are means with 95% intervals: Wilson for 0/1 scores, mean ± 1.96·sd/√n otherwise. "
             "A score's own n is shown when some answers were not judged for it.", ""]
    for task, ts in summary.items():
        header = ["method", "n", *(label(k) for k in ts.score_keys),
                  "seconds / answer", "answer tokens", "forward tokens / answer", "forward passes / answer"]
        lines += [f"## {task}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for method, ms in ts.methods.items():
            cells = [method.replace("|", "\\|"), str(ms.n)]
            cells += [fmt_estimate(ms.scores[k], ms.n) if k in ms.scores else "–" for k in ts.score_keys]
            cells += [fmt_mean(ms.seconds, 2), fmt_mean(ms.answer_tokens, 1), fmt_mean(ms.forward_tokens, 0),
                      fmt_mean(ms.forward_passes, 0)]
            lines.append("| " + " | ".join(cells) + " |")
        for method, p in ts.paired.items():
            changes = "".join(f"; {label(m['score'])} 0 → 1 on {m['up']}, 1 → 0 on {m['down']} "
                              f"(exact McNemar p = {m['p_mcnemar']:.3g})" for m in [p, *p.get("also", [])]
                              if "score" in m)
            lines.append(f"\nPaired with vanilla: {method}: {p['differ']} of {p['n']} answers differ{changes}.")
        lines += ["", f"Judges: {'; '.join(ts.judges) or 'not recorded'}. "
                      f"Model{'s' if len(ts.models) > 1 else ''}: {', '.join(ts.models) or 'not recorded'}.", ""]
    lines += ["## Plots", "", *(f"- {note}" for note in plot_notes), ""]
    return "\n".join(lines)


def write_csv(summary: dict[str, TaskSummary], path: Path) -> None:
    """One row per (task, method, score), then seconds, answer tokens, forward tokens and passes."""
    columns = ["task", "method", "score", "label", "n", "mean", "lower", "upper", "interval"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for task, ts in summary.items():
            for method, ms in ts.methods.items():
                rows: list[tuple[str, str, Estimate | None]] = [(k, label(k), e) for k, e in ms.scores.items()]
                rows += [("seconds", "seconds / answer", ms.seconds),
                         ("answer_tokens", "answer tokens", ms.answer_tokens),
                         ("forward_tokens", "forward tokens / answer", ms.forward_tokens),
                         ("forward_passes", "forward passes / answer", ms.forward_passes)]
                for key, name, e in rows:
                    if e is not None:
                        writer.writerow({"task": task, "method": method, "score": key, "label": name,
                                         **e.as_dict()})


# ---------------------------------------------------------------- plots


def measure(ms: MethodSummary, choice: tuple[str, bool, str]) -> Estimate | None:
    """A method's estimate for a (key, flip, label) choice, as 1 - score when flipped."""
    key, flip, _ = choice
    if key not in ms.scores:
        return None
    return ms.scores[key].flipped() if flip else ms.scores[key]


def task_measure(ts: TaskSummary, choices: tuple) -> tuple[str, bool, str] | None:
    """The first choice that some method of the task has, so every point of a panel shares its axis."""
    for choice in choices:
        if any(choice[0] in ms.scores for ms in ts.methods.values()):
            return choice
    return None


def errors(estimates: list[Estimate]) -> list[list[float]]:
    """Asymmetric error bars; none where the interval is undefined."""
    def gap(a: float, b: float) -> float:
        return 0.0 if math.isnan(a) or math.isnan(b) else max(0.0, a - b)

    return [[gap(e.mean, e.lower) for e in estimates], [gap(e.upper, e.mean) for e in estimates]]


def new_figure(panels: int):
    """A figure with one panel per task, drawn by Agg so no display (or pyplot state) is involved."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(panels, 3)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(5.2 * cols, 4.4 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes


def scatter(ax, xs: list[Estimate], ys: list[Estimate], names: list[str]) -> None:
    ax.errorbar([e.mean for e in xs], [e.mean for e in ys], xerr=errors(xs), yerr=errors(ys),
                fmt="o", capsize=3, color="tab:blue", ecolor="tab:gray")
    placed: list[tuple[float, float]] = []
    for x, y, name in zip(xs, ys, names):
        stacked = sum(1 for p in placed if p == (x.mean, y.mean))  # methods on the same point: stack labels
        placed.append((x.mean, y.mean))
        ax.annotate(name, (x.mean, y.mean), textcoords="offset points", xytext=(6, 6 + 11 * stacked), fontsize=9)
    ax.margins(0.15)  # room for the labels of points at the edges
    ax.grid(True, alpha=0.3)


def plot_harmless_vs_helpful(summary: dict[str, TaskSummary], path: Path) -> str | None:
    """Harmlessness against helpfulness per method, as in the RAIN paper; a reason when skipped."""
    panels = []
    for task, ts in summary.items():
        choice = task_measure(ts, HARMLESSNESS)
        if choice is None:
            continue
        points = [(m, ms.scores["helpful"], y) for m, ms in ts.methods.items()
                  if "helpful" in ms.scores and (y := measure(ms, choice)) is not None]
        if points:
            panels.append((task, choice[2], points))
    if not panels:
        return "no task has both a harmlessness score (harmless, harmful or jailbroken) and helpful"
    fig, axes = new_figure(len(panels))
    for ax, (task, y_label, points) in zip(axes, panels):
        scatter(ax, [p[1] for p in points], [p[2] for p in points], [p[0] for p in points])
        ax.set(title=task, xlabel="helpful", ylabel=y_label)
    fig.savefig(path, dpi=120)
    return None


def score_vs_compute_panels(summary: dict[str, TaskSummary]) -> list[tuple[str, str, list]]:
    """Per task: (task, y label, [(method, forward tokens per answer, score)]) for the compute plot."""
    panels = []
    for task, ts in summary.items():
        choice = task_measure(ts, MAIN_SCORES)
        if choice is None:
            continue
        points = [(m, ms.forward_tokens, measure(ms, choice)) for m, ms in ts.methods.items()
                  if ms.forward_tokens and ms.forward_tokens.mean > 0 and measure(ms, choice)]
        if points:
            panels.append((task, choice[2], points))
    return panels


def plot_score_vs_compute(summary: dict[str, TaskSummary], path: Path) -> str | None:
    """Each method's main score (attack success for AdvBench) against forward tokens per answer:
    what the alignment costs, and whether a baseline with the same compute does as well."""
    panels = score_vs_compute_panels(summary)
    if not panels:
        return ("no task has a main score (harmless, harmful, jailbroken, truthful, positive or accuracy) "
                "together with forward-token counts")
    fig, axes = new_figure(len(panels))
    for ax, (task, y_label, points) in zip(axes, panels):
        scatter(ax, [p[1] for p in points], [p[2] for p in points], [p[0] for p in points])
        ax.set_xscale("log")
        ax.set(title=task, xlabel="forward tokens per answer (log)", ylabel=y_label)
    fig.savefig(path, dpi=120)
    return None


# ---------------------------------------------------------------- entry point


def write_report(paths: list[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Write report.md, report.csv and the plots into out_dir; return what was written and the numbers."""
    records, duplicates = load(paths)
    summary = summarise(records)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    plots: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for name, draw in zip(PLOTS, (plot_harmless_vs_helpful, plot_score_vs_compute)):
        target = out / name
        reason = draw(summary, target)
        if reason is None:
            plots[name] = str(target)
        else:
            target.unlink(missing_ok=True)  # a plot left by an earlier report would no longer match
            skipped[name] = reason
    notes = [f"{name}: written" for name in plots] + [f"{name}: skipped, {why}" for name, why in skipped.items()]

    sources = [str(p) for p in paths]
    (out / "report.md").write_text(markdown(summary, sources, len(records), duplicates, notes))
    write_csv(summary, out / "report.csv")
    return {
        "out_dir": str(out),
        "files": [str(out / "report.md"), str(out / "report.csv"), *plots.values()],
        "records": len(records),
        "duplicates": duplicates,
        "plots": plots,
        "skipped_plots": skipped,
        "tasks": {task: {m: ms.as_dict() for m, ms in ts.methods.items()} for task, ts in summary.items()},
        "paired_with_vanilla": {task: ts.paired for task, ts in summary.items() if ts.paired},
    }
