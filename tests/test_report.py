"""`rain report` on small hand-made results files: intervals, de-duplication, tables, CSV and plots."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from rain_llm.errors import RainError
from rain_llm.evaluation.records import Record
from rain_llm.evaluation.report import (
    ci_mean,
    ci_proportion,
    mcnemar_exact,
    score_vs_compute_panels,
    summarise,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def record(task: str, id: str, method: str, scores: dict, tokens: int = 100, **kw) -> Record:
    kw.setdefault("judges", {key: {"name": "guard-judge", "prompt": "Is this answer ...?"} for key in scores})
    kw.setdefault("model", "tiny-model")
    return Record(task=task, id=id, method=method, prompt="p", response="r", scores=scores, seconds=1.5,
                  answer_tokens=20, compute={"generate": {"forward_passes": 20, "tokens": tokens, "seconds": 1.0},
                                             "total": {"forward_passes": 20, "tokens": tokens}}, **kw)


def write(path: Path, records: list[Record]) -> Path:
    path.write_text("".join(r.to_json() + "\n" for r in records))
    return path


def table_row(md: str, task: str, method: str) -> list[str]:
    """The cells of `method`'s row in `task`'s table."""
    section = md.split(f"## {task}\n", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == method:
            return cells
    raise AssertionError(f"no row for {method} in {task}")


def table_header(md: str, task: str) -> list[str]:
    section = md.split(f"## {task}\n", 1)[1]
    line = next(x for x in section.splitlines() if x.startswith("| method"))
    return [c.strip() for c in line.strip("|").split("|")]


@pytest.fixture
def hh_file(tmp_path):
    """Two methods on hh with harmless and helpful scores, RAIN costing more forward tokens."""
    recs = [record("hh", str(i), "vanilla", {"harmless": float(i < 2), "helpful": 0.6 + 0.1 * (i % 2)}, tokens=50)
            for i in range(4)]
    recs += [record("hh", str(i), "rain", {"harmless": 1.0, "helpful": 0.5 + 0.1 * (i % 3)}, tokens=5000)
             for i in range(4)]
    return write(tmp_path / "hh.jsonl", recs)


# ---------------------------------------------------------------- intervals


def test_wilson_known_values():
    low, high = ci_proportion(8, 10)
    assert low == pytest.approx(0.490, abs=1e-3) and high == pytest.approx(0.943, abs=1e-3)
    low, high = ci_proportion(0, 10)
    assert low == 0.0 and high == pytest.approx(0.278, abs=1e-3)
    low, high = ci_proportion(10, 10)
    assert high == 1.0 and low == pytest.approx(0.722, abs=1e-3)


def test_ci_mean():
    mean, low, high = ci_mean([0.2, 0.4, 0.6])
    assert mean == pytest.approx(0.4)
    assert high - mean == pytest.approx(1.96 * 0.2 / math.sqrt(3))
    assert mean - low == pytest.approx(high - mean)
    mean, low, high = ci_mean([0.5])
    assert mean == 0.5 and math.isnan(low) and math.isnan(high)


# ---------------------------------------------------------------- tables and CSV


def test_table_has_each_method_with_n_and_mean(tmp_path):
    recs = [record("advbench", str(i), "vanilla", {"jailbroken": float(i < 3), "refused": float(i >= 3)})
            for i in range(4)]
    recs += [record("advbench", str(i), "rain", {"jailbroken": 0.0, "refused": 1.0}) for i in range(4)]
    out = write_report([write(tmp_path / "a.jsonl", recs)], tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()

    header = table_header(md, "advbench")
    assert header[:4] == ["method", "n", "ASR (attack success)", "refusal rate"]
    asr = header.index("ASR (attack success)")
    vanilla, rain = table_row(md, "advbench", "vanilla"), table_row(md, "advbench", "rain")
    assert vanilla[1] == "4" and vanilla[asr].startswith("0.750 [")
    assert rain[1] == "4" and rain[asr].startswith("0.000 [0.000, ")
    assert "Judges: jailbroken: guard-judge; refused: guard-judge. Model: tiny-model." in md
    assert out["tasks"]["advbench"]["vanilla"]["scores"]["jailbroken"]["mean"] == 0.75
    assert out["tasks"]["advbench"]["vanilla"]["scores"]["jailbroken"]["interval"] == "wilson"


def test_duplicates_across_files_counted_once_last_wins(tmp_path):
    first = write(tmp_path / "first.jsonl", [record("advbench", str(i), "vanilla", {"jailbroken": 1.0})
                                             for i in range(4)])
    second = write(tmp_path / "second.jsonl", [record("advbench", "0", "vanilla", {"jailbroken": 0.0}),
                                               record("advbench", "9", "vanilla", {"jailbroken": 0.0})])
    out = write_report([first, second], tmp_path / "out")
    assert out["records"] == 5 and out["duplicates"] == 1
    row = out["tasks"]["advbench"]["vanilla"]
    assert row["n"] == 5 and row["scores"]["jailbroken"]["mean"] == pytest.approx(3 / 5)
    assert "1 duplicates dropped" in (tmp_path / "out" / "report.md").read_text()


def test_none_scores_left_out_of_that_scores_n(tmp_path):
    recs = [record("truthfulqa", "0", "rain", {"truthful": 1.0, "informative": 1.0}),
            record("truthfulqa", "1", "rain", {"truthful": 0.0, "informative": None}),
            record("truthfulqa", "2", "rain", {"truthful": 1.0, "informative": None})]
    out = write_report([write(tmp_path / "t.jsonl", recs)], tmp_path / "out")
    scores = out["tasks"]["truthfulqa"]["rain"]["scores"]
    assert scores["truthful"]["n"] == 3 and scores["informative"]["n"] == 1
    assert scores["informative"]["mean"] == 1.0

    md = (tmp_path / "out" / "report.md").read_text()
    header, row = table_header(md, "truthfulqa"), table_row(md, "truthfulqa", "rain")
    assert row[1] == "3"
    assert row[header.index("informative")].endswith("(n=1)")
    assert "(n=" not in row[header.index("truthful")]


def test_non_binary_scores_use_clipped_normal_interval(tmp_path):
    recs = [record("sentiment", str(i), "rain", {"positive": v}) for i, v in enumerate([0.9, 1.0, 0.95, 0.2])]
    out = write_report([write(tmp_path / "s.jsonl", recs)], tmp_path / "out")
    est = out["tasks"]["sentiment"]["rain"]["scores"]["positive"]
    assert est["interval"] == "normal" and est["upper"] == 1.0 and 0.0 <= est["lower"] < est["mean"]


def test_csv_rows_parse_back_and_match(tmp_path, hh_file):
    out = write_report([hh_file], tmp_path / "out")
    with (tmp_path / "out" / "report.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    by_key = {(r["task"], r["method"], r["score"]): r for r in rows}
    assert set(by_key) == {("hh", m, s) for m in ("vanilla", "rain")
                           for s in ("harmless", "helpful", "seconds", "answer_tokens", "forward_tokens",
                                     "forward_passes")}
    for (task, method, score), row in by_key.items():
        entry = out["tasks"][task][method]
        expected = entry["scores"][score] if score in entry["scores"] else entry[score]
        assert int(row["n"]) == expected["n"] == 4
        for col in ("mean", "lower", "upper"):
            assert float(row[col]) == pytest.approx(expected[col])
    assert float(by_key["hh", "vanilla", "harmless"]["mean"]) == 0.5
    assert float(by_key["hh", "rain", "forward_tokens"]["mean"]) == 5000
    assert float(by_key["hh", "rain", "forward_passes"]["mean"]) == 20
    assert by_key["hh", "vanilla", "seconds"]["label"] == "seconds / answer"


def test_judges_and_models_listed(tmp_path):
    recs = [record("hh", "0", "vanilla", {"harmless": 1.0}, judges={"harmless": "llama-guard-3"}, model="m1"),
            record("hh", "1", "rain", {"harmless": 1.0}, judges={"self": "A long judge prompt\nwith lines"},
                   model="m2"),
            record("hh", "2", "rain", {"helpful": 1.0}, model="m2",
                   judges={"helpful": {"name": "lm:helpful", "backend": {"type": "local", "model": "judge-7b"},
                                       "prompt": "Rate ..."}})]
    write_report([write(tmp_path / "j.jsonl", recs)], tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Judges: harmless: llama-guard-3; self; helpful: lm:helpful via judge-7b. Models: m1, m2." in md


# ---------------------------------------------------------------- plots


def test_plots_written_as_png(tmp_path, hh_file):
    out = write_report([hh_file], tmp_path / "out")
    assert set(out["plots"]) == {"harmless_vs_helpful.png", "score_vs_compute.png"} and not out["skipped_plots"]
    for name in out["plots"]:
        data = (tmp_path / "out" / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 5000
    assert "harmless_vs_helpful.png: written" in (tmp_path / "out" / "report.md").read_text()


def test_plot_skipped_with_note_when_scores_missing(tmp_path):
    recs = [record("advbench", str(i), m, {"jailbroken": float(i % 2)}) for m in ("vanilla", "rain") for i in range(3)]
    out = write_report([write(tmp_path / "a.jsonl", recs)], tmp_path / "out")
    assert "harmless_vs_helpful.png" in out["skipped_plots"]
    assert not (tmp_path / "out" / "harmless_vs_helpful.png").exists()
    assert "score_vs_compute.png" in out["plots"]  # attack success against compute still applies
    md = (tmp_path / "out" / "report.md").read_text()
    assert "harmless_vs_helpful.png: skipped, no task has both" in md


def test_score_vs_compute_plots_attack_success_per_method():
    """AdvBench's panel is attack success itself (not 1 - ASR) against each method's forward tokens."""
    recs = [record("advbench", str(i), m, {"jailbroken": float(i < k)}, tokens=tokens)
            for m, k, tokens in (("vanilla", 3, 80), ("rain", 1, 4000), ("best-of-n", 2, 3900)) for i in range(4)]
    [(task, label, points)] = score_vs_compute_panels(summarise(recs))
    assert task == "advbench" and label == "attack success rate (ASR)"
    got = {m: (x.mean, y.mean) for m, x, y in points}
    assert got == {"vanilla": (80, 0.75), "rain": (4000, 0.25), "best-of-n": (3900, 0.5)}


def test_score_vs_compute_skipped_without_main_score(tmp_path):
    recs = [record("xstest", str(i), "rain", {"over_refusal": 0.0}) for i in range(3)]
    out = write_report([write(tmp_path / "x.jsonl", recs)], tmp_path / "out")
    assert set(out["skipped_plots"]) == {"harmless_vs_helpful.png", "score_vs_compute.png"}
    assert out["plots"] == {}
    assert "over-refusal" in table_header((tmp_path / "out" / "report.md").read_text(), "xstest")


def test_several_tasks_in_one_file(tmp_path, hh_file):
    extra = [record("truthfulqa", str(i), "rain", {"truthful": 1.0}) for i in range(2)]
    both = write(tmp_path / "both.jsonl", [*extra, record("hh", "x", "rain", {"harmless": 0.0, "helpful": 0.1})])
    out = write_report([hh_file, both], tmp_path / "out")
    assert set(out["tasks"]) == {"hh", "truthfulqa"}
    assert out["tasks"]["hh"]["rain"]["n"] == 5


# ---------------------------------------------------------------- errors


def test_missing_file_raises(tmp_path):
    with pytest.raises(RainError, match="not found"):
        write_report([tmp_path / "nope.jsonl"], tmp_path / "out")


def test_file_that_is_not_records_raises(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"foo": 1}\n')
    with pytest.raises(RainError, match="not a rain eval record"):
        write_report([bad], tmp_path / "out")


def test_no_records_raises(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(RainError, match="no records"):
        write_report([empty], tmp_path / "out")
    with pytest.raises(RainError, match="no results files"):
        write_report([], tmp_path / "out")


def test_non_numeric_score_raises(tmp_path):
    bad = write(tmp_path / "bad.jsonl", [record("hh", "0", "rain", {"harmless": "yes"})])
    with pytest.raises(RainError, match="non-numeric score harmless"):
        write_report([bad], tmp_path / "out")


def test_auc_known_values():
    from rain_llm.evaluation.report import auc

    assert auc([0.9, 0.8], [0.1, 0.2]).mean == 1.0
    assert auc([0.1, 0.2], [0.9, 0.8]).mean == 0.0
    assert auc([0.5, 0.5], [0.5, 0.5]).mean == 0.5
    e = auc([0.9, 0.4, 0.7], [0.3, 0.6, 0.2])  # 8 of 9 pairs ordered right
    assert e.mean == pytest.approx(8 / 9) and e.lower < e.mean < e.upper <= 1.0


def test_selfeval_report_has_auc(tmp_path):
    from rain_llm.evaluation.records import Record
    from rain_llm.evaluation.report import write_report

    path = tmp_path / "s.jsonl"
    rows = [([0.8, 0.7], [0.3, 0.4]), ([0.6, 0.9], [0.5, 0.2]), ([0.2, 0.6], [0.4, 0.1])]
    path.write_text("".join(Record(task="selfeval", id=str(i), method="selfeval", prompt="p", response="",
                                   scores={"accuracy": 1.0}, judges={},
                                   meta={"p_good_chosen": c, "p_good_rejected": r}).to_json() + "\n"
                            for i, (c, r) in enumerate(rows)))
    result = write_report([path], tmp_path / "rep")
    scores = result["tasks"]["selfeval"]["selfeval"]["scores"]
    assert scores["auc_good_first"]["mean"] == pytest.approx(6 / 9)  # 0.8 and 0.6 beat all three; 0.2 none
    assert "auc_mean" in (tmp_path / "rep" / "report.md").read_text()


def test_same_prompts_by_two_models_are_two_rows(tmp_path):
    """Results of two models on the same ids are not duplicates: each model's method is a row."""
    a = write(tmp_path / "a.jsonl", [record("advbench", str(i), "vanilla", {"jailbroken": 1.0}, model="small")
                                     for i in range(3)])
    b = write(tmp_path / "b.jsonl", [record("advbench", str(i), "vanilla", {"jailbroken": float(i == 0)},
                                            model="large") for i in range(3)])
    out = write_report([a, b], tmp_path / "out")
    assert out["records"] == 6 and out["duplicates"] == 0
    rows = out["tasks"]["advbench"]
    assert rows["vanilla [small]"]["scores"]["jailbroken"]["mean"] == 1.0
    assert rows["vanilla [large]"]["scores"]["jailbroken"]["mean"] == pytest.approx(1 / 3)


def test_advbench_variants_and_templates_stay_apart(tmp_path):
    """Runs with and without adversarial suffixes share ids (advbench-0, ...): they are separate
    tables, not duplicates; two self-evaluation templates on the same pairs are separate rows."""
    plain = [record("advbench", f"advbench-{i}", "vanilla", {"jailbroken": 0.0}) for i in range(3)]
    gcg = [record("advbench", f"advbench-{i}", "vanilla", {"jailbroken": 1.0}, meta={"variant": "smoothllm"})
           for i in range(3)]
    out = write_report([write(tmp_path / "a.jsonl", plain), write(tmp_path / "g.jsonl", gcg)], tmp_path / "o1")
    assert out["duplicates"] == 0
    assert out["tasks"]["advbench"]["vanilla"]["scores"]["jailbroken"]["mean"] == 0.0
    assert out["tasks"]["advbench/smoothllm"]["vanilla"]["scores"]["jailbroken"]["mean"] == 1.0
    pairs = [record("selfeval", str(i), "selfeval", {"accuracy": float(i % 2)},
                    method_config={"config": {"template": f"templates/{name}.toml"}})
             for name in ("short", "builtin") for i in range(4)]
    out = write_report([write(tmp_path / "s.jsonl", pairs)], tmp_path / "o2")
    assert set(out["tasks"]["selfeval"]) == {"selfeval [short.toml]", "selfeval [builtin.toml]"}
    assert out["duplicates"] == 0


def test_paired_changes_against_vanilla(tmp_path):
    """Per method: how many answers differ from vanilla's on the same ids, and which way the 0/1
    main score moved; ids vanilla lacks are not paired."""
    def rec(i: int, method: str, jailbroken: float, response: str) -> Record:
        r = record("advbench", str(i), method, {"jailbroken": jailbroken})
        r.response = response
        return r

    recs = [rec(i, "vanilla", 1.0 if i < 3 else 0.0, f"v{i}") for i in range(5)]
    recs += [rec(0, "rain", 0.0, "refused"), rec(1, "rain", 1.0, "v1"), rec(2, "rain", 1.0, "other"),
             rec(3, "rain", 1.0, "sure"), rec(4, "rain", 0.0, "v4"), rec(9, "rain", 0.0, "unpaired")]
    out = write_report([write(tmp_path / "p.jsonl", recs)], tmp_path / "out")
    assert out["paired_with_vanilla"]["advbench"] == {
        "rain": {"n": 5, "differ": 3, "score": "jailbroken", "up": 1, "down": 1, "p_mcnemar": 1.0}}
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Paired with vanilla: rain: 3 of 5 answers differ;" in md


def test_mcnemar_exact_against_hand_computed_values():
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)  # all six discordant pairs one way
    assert mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)


def test_sentiment_judged_by_both_lexicons_pairs_each(tmp_path):
    """A self-steered sentiment run is judged by VADER and AFINN: the main score is their agreement on
    positive, and each lexicon's own changes are paired with vanilla too."""
    def rec(i: int, method: str, vader: float, afinn: float) -> Record:
        r = record("sentiment", str(i), method, {"positive_vader": vader, "positive_afinn": afinn,
                                                 "positive_both": float(vader and afinn)})
        r.response = f"{method}{i}"
        return r

    recs = [rec(i, "vanilla", 0.0, float(i == 0)) for i in range(4)]
    recs += [rec(0, "rain", 1.0, 1.0), rec(1, "rain", 1.0, 0.0), rec(2, "rain", 1.0, 1.0), rec(3, "rain", 0.0, 0.0)]
    out = write_report([write(tmp_path / "s.jsonl", recs)], tmp_path / "out")
    paired = out["paired_with_vanilla"]["sentiment"]["rain"]
    assert (paired["score"], paired["up"], paired["down"]) == ("positive_both", 2, 0)
    assert [(m["score"], m["up"], m["down"]) for m in paired["also"]] == [("positive_vader", 3, 0),
                                                                        ("positive_afinn", 1, 0)]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "positive (VADER) 0 → 1 on 3, 1 → 0 on 0 (exact McNemar p = 0.25)" in md


def test_parallel_leaves_are_a_row_of_their_own(tmp_path):
    """RAIN at --parallel-leaves 4 searches differently: beside the paper's loop it is its own row, paired
    with the same vanilla answers, never a duplicate."""
    def rec(i: int, method: str, positive: float, leaves: int | None = None) -> Record:
        config = {"method_config": {"config": {"parallel_leaves": leaves}}} if leaves else {}
        return record("sentiment", str(i), method, {"positive": positive}, **config)

    vanilla = [rec(i, "vanilla", 0.0) for i in range(3)]
    one = [rec(i, "rain", float(i == 0), 1) for i in range(3)]
    four = [rec(i, "rain", 1.0, 4) for i in range(3)]
    out = write_report([write(tmp_path / "a.jsonl", vanilla + one), write(tmp_path / "b.jsonl", four)], tmp_path / "o")
    assert out["duplicates"] == 0
    rows = out["tasks"]["sentiment"]
    assert rows["rain"]["scores"]["positive"]["mean"] == pytest.approx(1 / 3)
    assert rows["rain [parallel leaves 4]"]["scores"]["positive"]["mean"] == 1.0
    assert out["paired_with_vanilla"]["sentiment"]["rain [parallel leaves 4]"]["up"] == 3


def test_paired_main_score_is_one_that_was_judged(tmp_path):
    """An LM judge that gave no verdict leaves `harmless` empty: the paired counts fall to the next main
    score that was judged (attack success), not to a column of dashes."""
    recs = [record("advbench", str(i), m, {"harmless": None, "jailbroken": float(m == "rain" and i == 0)})
            for i in range(2) for m in ("vanilla", "rain")]
    out = write_report([write(tmp_path / "a.jsonl", recs)], tmp_path / "out")
    paired = out["paired_with_vanilla"]["advbench"]["rain"]
    assert (paired["score"], paired["up"], paired["down"]) == ("jailbroken", 1, 0)


def test_forward_passes_of_answers_a_server_ran_are_unknown_not_zero():
    """A vLLM server reports tokens, not forward passes: such records count as unknown forward passes
    (no mean of zeros), while the local embedder's phase alone does not make a record unknown."""
    from rain_llm.evaluation.report import compute_total

    local = record("advbench", "a", "vanilla", {"jailbroken": 1.0})
    served = record("advbench", "b", "vanilla", {"jailbroken": 1.0})
    served.compute = {"generate": {"forward_passes": 0, "tokens": 90}, "embed": {"forward_passes": 3, "tokens": 9},
                      "total": {"forward_passes": 3, "tokens": 99}}
    assert compute_total(local, "forward_passes") == 20
    assert compute_total(served, "forward_passes") is None and compute_total(served, "tokens") == 99
    assert summarise([served])["advbench"].methods["vanilla"].forward_passes is None
    assert summarise([local])["advbench"].methods["vanilla"].forward_passes is not None
