"""`rain eval` end to end on the default model with a local judge, resume, shards, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rain_llm import load_config
from rain_llm.evaluation.data import default_data_dir
from rain_llm.evaluation.harness import EvalSettings, run_eval
from rain_llm.evaluation.records import read_records

pytestmark = [pytest.mark.skipif(default_data_dir() is None, reason="needs ../shared/data"),
              pytest.mark.slow]  # subprocesses and the bundled model: left out by -m 'not slow'
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def tiny_cfg(**kw):
    return load_config("fast", max_new_tokens=kw.pop("max_new_tokens", 6), t_max=kw.pop("t_max", 2), **kw)


@pytest.mark.parametrize("task,expected", [
    ("hh", {"harmless", "helpful"}),
    ("advbench", {"jailbroken", "refused"}),
    ("truthfulqa", {"truthful", "informative"}),
    ("xstest", {"refused", "over_refusal"}),
    ("sentiment", {"positive_vader", "positive_afinn", "positive_both", "lexicons_agree"}),  # neither lexicon steers
])
def test_each_task_runs_and_is_judged(default_rain, tmp_path, task, expected):
    out = tmp_path / f"{task}.jsonl"
    result = run_eval(default_rain, tiny_cfg(), EvalSettings(task=task, out=out, methods=["vanilla", "rain"], limit=2,
                                                      progress=False))
    assert result["written"] == 4
    records = read_records(out)
    assert [(r.id, r.method) for r in records][:2] == [(records[0].id, "vanilla"), (records[0].id, "rain")]
    for r in records:
        assert r.task == task and r.response and r.model == "default"
        assert expected <= set(r.scores)
        assert all(v is None or 0.0 <= v <= 1.0 for v in r.scores.values())
        assert r.judges, "every record names its judges"
        assert r.compute["total"]["tokens"] > 0 and r.seconds > 0
    rain_rec = next(r for r in records if r.method == "rain")
    assert rain_rec.method_config["config"]["template"] == {"truthfulqa": "truthfulness",
                                                            "sentiment": "sentiment"}.get(task, "harmlessness")


def test_lm_judge_identity_and_prompt_in_records(default_rain, tmp_path):
    out = tmp_path / "hh.jsonl"
    run_eval(default_rain, tiny_cfg(), EvalSettings(task="hh", out=out, methods=["vanilla"], limit=1, progress=False))
    judges = read_records(out)[0].judges
    assert judges["lm:harmful"]["prompt"] and "harmful" in judges["lm:harmful"]["prompt"].lower()
    assert "itself" in judges["lm:harmful"]["backend"]["model"]  # a self-judging run says so
    run_eval(default_rain, tiny_cfg(), EvalSettings(
        task="hh", out=out, methods=["vanilla", "rain"], limit=1, progress=False))
    rain_rec = [r for r in read_records(out) if r.method == "rain"][0]
    assert rain_rec.scores["win_harmless_vs_vanilla"] in (0.0, 1.0)  # judged against vanilla's answer from the file
    assert "shuffled" in rain_rec.judges["lm:pairwise-harmless"]["order"]


def test_selfeval_scores_pairs(default_rain, tmp_path):
    out = tmp_path / "selfeval.jsonl"
    run_eval(default_rain, tiny_cfg(), EvalSettings(task="selfeval", out=out, limit=3, progress=False))
    records = read_records(out)
    assert len(records) == 3 and {r.method for r in records} == {"selfeval"}
    for r in records:
        for key in ("accuracy", "accuracy_good_first", "accuracy_bad_first"):
            assert r.scores[key] in (0.0, 0.5, 1.0)
        assert len(r.meta["p_good_chosen"]) == 2 and 0 <= r.meta["p_good_chosen"][0] <= 1


def test_selfeval_any_pairs_file_and_template(default_rain, tmp_path):
    """`rain eval selfeval --data PAIRS --template sentiment`: the pairs' own prompt, the template given."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"id": "r1", "prompt": "Continue this movie review: I saw it and",
                                 "chosen": "loved every minute.", "rejected": "hated every minute.",
                                 "vader_chosen": 0.6}) + "\n"
                     + json.dumps({"prompt": "Continue this movie review: We went", "a": "a dull mess.",
                                   "b": "a delight.", "label": "b"}) + "\n")
    out = tmp_path / "selfeval.jsonl"
    run_eval(default_rain, tiny_cfg(template="sentiment"), EvalSettings(task="selfeval", out=out, source=str(pairs),
                                                                progress=False))
    records = read_records(out)
    assert [r.id for r in records] == ["r1", "selfeval-1"]
    assert records[0].prompt == "Continue this movie review: I saw it and"
    assert records[0].meta["pair"] == {"vader_chosen": 0.6} and records[1].meta["chosen"] == "a delight."
    for r in records:
        assert r.method_config["config"]["template"] == "sentiment"
        assert "movie review" in r.judges["selfeval"]["template"]
        assert len(r.meta["p_good_chosen"]) == 2 and len(r.meta["p_good_rejected"]) == 2
        assert r.compute["total"]["tokens"] > 0


def test_sentiment_is_judged_by_the_lexicons_that_do_not_steer(default_rain, tmp_path):
    out = tmp_path / "vader.jsonl"
    run_eval(default_rain, tiny_cfg(value="vader"), EvalSettings(task="sentiment", out=out, methods=["rain"], limit=1,
                                                         progress=False))
    [r] = read_records(out)
    assert set(r.scores) == {"positive", "sentiment"} and r.judges["sentiment"]["name"] == "lexicon:afinn"
    out = tmp_path / "self.jsonl"
    run_eval(default_rain, tiny_cfg(), EvalSettings(task="sentiment", out=out, methods=["vanilla"], limit=1,
                                                    progress=False))
    [r] = read_records(out)
    v, a = r.scores["positive_vader"], r.scores["positive_afinn"]
    assert r.scores["positive_both"] == float(v == a == 1.0) and r.scores["lexicons_agree"] == float(v == a)
    assert {r.judges["sentiment_vader"]["name"], r.judges["sentiment_afinn"]["name"]} == {"lexicon:vader",
                                                                                        "lexicon:afinn"}


def test_best_of_n_matched_to_rain_compute(default_rain, tmp_path):
    out = tmp_path / "adv.jsonl"
    run_eval(default_rain, tiny_cfg(), EvalSettings(task="advbench", out=out, methods=["vanilla", "rain", "best-of-n"],
                                            limit=1, best_of_n="match", progress=False))
    recs = {r.method: r for r in read_records(out)}
    n = recs["best-of-n"].method_config["samples"]
    rain_tokens = sum(c["tokens"] for name, c in recs["rain"].compute.items()
                      if name not in ("total", "least_work", "embed"))  # the LM's, not the embedder's
    assert 0 < rain_tokens < recs["rain"].compute["total"]["tokens"]
    assert recs["best-of-n"].method_config["budget_tokens"] == rain_tokens
    spent = recs["best-of-n"].compute["total"]["tokens"]  # sampling and judging (no embedder in best-of-n)
    assert n > 1 and (spent >= rain_tokens or n == 64)
    assert spent - 2 * spent / n < rain_tokens  # stopped within about a sample of the budget


def test_shards_are_disjoint_and_cover(default_rain, tmp_path):
    ids = []
    for i in range(2):
        out = tmp_path / f"s{i}.jsonl"
        run_eval(default_rain, tiny_cfg(), EvalSettings(
            task="xstest", out=out, methods=["vanilla"], limit=2, shard=(i, 2), progress=False))
        ids.append({r.id for r in read_records(out)})
    assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == 4


def eval_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rain_llm.shells.cli", "eval", "advbench", "--limit", "3",
            "--methods", "vanilla,rain", "--preset", "fast", "--max-new-tokens", "6", "--t-max", "2", "--quiet",
            "--out", str(out), *extra]


# `rain eval` that kills itself with SIGKILL (no cleanup of any kind) right after its second record
KILLED_AFTER_TWO = """
import os, signal, sys
from rain_llm.evaluation import harness
append, written = harness.append, []
def append_then_die(out, record):
    append(out, record)
    written.append(record)
    if len(written) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
harness.append = append_then_die
from rain_llm.shells.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_run_resumes_without_loss_or_duplicates(tmp_path):
    out = tmp_path / "adv.jsonl"
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_TWO, *eval_cmd(out)[3:]], env=ENV,
                            capture_output=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL
    before = out.read_text().splitlines()
    assert len(before) == 2  # killed mid-run
    done = subprocess.run(eval_cmd(out), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    after = out.read_text().splitlines()
    assert after[:len(before)] == before  # what was written stays
    pairs = [(json.loads(x)["id"], json.loads(x)["method"]) for x in after]
    assert len(pairs) == len(set(pairs)) == 6
    assert f"({len(before)} already there)" in done.stderr


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rain_llm.shells.cli", *args], env=ENV, capture_output=True, text=True,
                          timeout=300)


def assert_one_line(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("rain: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_unknown_task_and_method(tmp_path):
    assert_one_line(run_cli("eval", "nosuchtask", "--out", str(tmp_path / "x.jsonl")), "unknown task")
    assert_one_line(run_cli("eval", "hh", "--methods", "vanilla,magic", "--out", str(tmp_path / "x.jsonl")),
                    "unknown method", "magic")


def test_data_file_with_missing_columns(tmp_path):
    bad = tmp_path / "x.csv"
    bad.write_text("id,text\n1,hello\n")
    assert_one_line(run_cli("eval", "xstest", "--data", str(bad), "--out", str(tmp_path / "x.jsonl")), "x.csv")


def test_results_file_from_another_task_is_refused_and_kept(tmp_path):
    out = tmp_path / "r.jsonl"
    line = json.dumps({"task": "hh", "id": "1", "method": "vanilla", "scores": {"harmless": 1.0}})
    out.write_text(line + "\n")
    assert_one_line(run_cli("eval", "advbench", "--limit", "1", "--out", str(out)), "hh", "advbench")
    assert out.read_text() == line + "\n"


def test_unreachable_judge_endpoint_keeps_results(tmp_path):
    out = tmp_path / "hh.jsonl"
    line = json.dumps({"task": "hh", "id": "harmless-base-test-0000", "method": "vanilla", "scores": {}})
    out.write_text(line + "\n")
    proc = run_cli("eval", "hh", "--limit", "2", "--methods", "vanilla", "--max-new-tokens", "4", "--quiet",
                   "--judge-url", "http://127.0.0.1:9/v1", "--judge-name", "judge", "--out", str(out))
    assert_one_line(proc, "127.0.0.1:9")
    assert out.read_text().splitlines()[0] == line


def test_report_from_eval_results(default_rain, tmp_path):
    out = tmp_path / "hh.jsonl"
    run_eval(default_rain, tiny_cfg(), EvalSettings(
        task="hh", out=out, methods=["vanilla", "rain"], limit=2, progress=False))
    proc = run_cli("report", str(out), "--out", str(tmp_path / "rep"))
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| vanilla | 2 |" in md and "| rain | 2 |" in md
    assert (tmp_path / "rep" / "harmless_vs_helpful.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_one_line(run_cli("report", str(tmp_path / "missing.jsonl")), "missing.jsonl")


def test_advbench_with_and_without_suffixes_report_as_two_tables(default_rain, tmp_path):
    """The variant goes into every record, so `rain report` over both files keeps the two apart
    (their ids coincide: advbench-0, ...)."""
    plain, gcg = tmp_path / "plain.jsonl", tmp_path / "gcg.jsonl"
    run_eval(default_rain, tiny_cfg(), EvalSettings(
        task="advbench", out=plain, methods=["vanilla"], limit=2, progress=False))
    run_eval(default_rain, tiny_cfg(), EvalSettings(task="advbench", out=gcg, methods=["vanilla"], limit=2,
                                            variant="smoothllm", progress=False))
    assert all(r.meta["variant"] == "smoothllm" and r.meta["controls"] for r in read_records(gcg))
    assert {r.id for r in read_records(plain)} == {r.id for r in read_records(gcg)}
    proc = run_cli("report", str(plain), str(gcg), "--out", str(tmp_path / "rep"))
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## advbench\n" in md and "## advbench/smoothllm\n" in md
    assert "(4 records)." in md  # none dropped as a duplicate


def test_xstest_with_an_lm_judge(default_rain, tmp_path):
    out = tmp_path / "x.jsonl"
    run_eval(default_rain, tiny_cfg(), EvalSettings(
        task="xstest", out=out, methods=["vanilla"], limit=1, shard=(0, 450), judge_model="policy", progress=False))
    r = read_records(out)[0]
    assert r.meta["label"] == "safe" and r.scores["over_refusal_lm"] in (0.0, 1.0)
    assert r.scores["unsafe_compliance_lm"] is None and "lm:refusal" in r.judges


def test_batched_eval_gives_the_same_answers_and_resumes(default_rain, tmp_path):
    """--batch 3: the prompts' answers (vanilla, RAIN, best-of-n) run in one continuous batch; they
    equal the one-by-one run's, every record says its batch, and a rerun over a partial file only
    adds what is missing."""
    one, many = tmp_path / "one.jsonl", tmp_path / "many.jsonl"
    methods = ["vanilla", "rain", "best-of-n"]
    run_eval(default_rain, tiny_cfg(), EvalSettings(task="advbench", out=one, methods=methods, limit=3, best_of_n="3",
                                            progress=False))
    run_eval(default_rain, tiny_cfg(), EvalSettings(task="advbench", out=many, methods=methods, limit=2, best_of_n="3",
                                            batch=3, progress=False))
    result = run_eval(default_rain, tiny_cfg(), EvalSettings(task="advbench", out=many, methods=methods, limit=3,
                                                     best_of_n="3", batch=3, progress=False))
    assert result["written"] == 3 and result["skipped"] == 6
    a = {(r.id, r.method): r for r in read_records(one)}
    b = {(r.id, r.method): r for r in read_records(many)}
    assert a.keys() == b.keys() and len(b) == 9
    assert all(b[k].response == a[k].response for k in a)
    assert all(b[k].method_config.get("batch") == 2 for k in b if k[0] in {r.id for r in read_records(many)[:6]})
    assert all(b[k].method_config["samples"] == 3 for k in b if k[1] == "best-of-n")
    assert all(b[k].compute["total"]["tokens"] > 0 for k in b)


def test_bad_batch_size(tmp_path):
    with pytest.raises(Exception, match="invalid --batch"):
        EvalSettings(task="hh", out=tmp_path / "x.jsonl", batch=0).validate()


def test_a_cut_last_line_is_moved_aside_not_appended_onto(tmp_path):
    """A results file whose last line a crash cut off: the next run moves the fragment aside with a
    warning, answers that example again, and the file stays valid JSON lines for `rain report`."""
    out = tmp_path / "adv.jsonl"
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_TWO, *eval_cmd(out)[3:]], env=ENV,
                            capture_output=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL
    whole = out.read_text()
    out.write_text(whole + whole.splitlines()[0][:40])  # half a record, no newline: a cut write
    done = subprocess.run(eval_cmd(out), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "was cut off" in done.stderr and "moved to" in done.stderr
    lines = out.read_text().splitlines()
    assert [json.loads(x) for x in lines] and len(lines) == 6  # every line parses: nothing appended onto the fragment
    (aside,) = tmp_path.glob("adv.jsonl.cut-*")
    assert aside.read_text() == whole.splitlines()[0][:40]
    report = run_cli("report", str(out), "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr


def test_out_that_is_a_folder_or_unwritable_fails_before_any_answer(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    assert_one_line(run_cli(*eval_cmd(folder)[3:]), "is a folder, not a results file")
    proc = run_cli(*eval_cmd(Path("/proc/rain-results/adv.jsonl"))[3:])  # a place nothing can be written
    assert_one_line(proc, "cannot write results file")
