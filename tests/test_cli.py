"""The command line's first hour: no silent abbreviations, a suggestion for a typo, thread control,
progress lines in logs, clear model errors, a bench table without NaNs."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import pytest

from rain_llm.search import SearchStatus
from rain_llm.shells.cli import Progress, main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rain: error:"), err
    return err[0]


def test_abbreviated_options_are_refused_with_a_suggestion(capsys):
    with pytest.raises(SystemExit) as code:
        main(["generate", "--max-new-token", "16", "hi"])
    assert code.value.code == 2
    line = one_error_line(capsys)
    assert "--max-new-token" in line and "did you mean --max-new-tokens" in line
    with pytest.raises(SystemExit):
        main(["eval", "hh", "--method", "rain"])  # eval's methods are --methods
    assert "did you mean --methods" in one_error_line(capsys)


def test_threads_flag_sets_torch_threads_in_the_process(tmp_path):
    """`--threads 1` reaches torch in the command's own process (seen in its --json output's run
    record), RAIN_THREADS does the same, and bad values are refused before any model loads."""
    code = ("import json, sys, torch\n"
            "from rain_llm.shells import cli\n"
            "load = cli.load_rain\n"
            "def spy(args):\n"
            "    print(json.dumps({'threads': torch.get_num_threads()}), file=sys.stderr)\n"
            "    raise SystemExit(0)\n"
            "cli.load_rain = lambda args: (cli.set_threads(args.threads), spy(args))\n"
            "sys.exit(cli.main(sys.argv[1:]))\n")

    def threads(*args: str, env: dict | None = None) -> int:
        proc = subprocess.run([sys.executable, "-c", code, "generate", *args, "hi"], capture_output=True, text=True,
                              env={**ENV, **(env or {})}, timeout=120)
        return json.loads(proc.stderr.strip().splitlines()[-1])["threads"]

    assert threads("--threads", "1") == 1
    assert threads(env={"RAIN_THREADS": "1"}) == 1
    assert threads("--threads", "2", env={"RAIN_THREADS": "1"}) == 2  # the flag wins
    for args, env, words in [(["--threads", "0"], {}, "invalid --threads 0"),
                             ([], {"RAIN_THREADS": "many"}, "invalid RAIN_THREADS='many'")]:
        proc = subprocess.run([sys.executable, "-m", "rain_llm.shells.cli", "generate", *args, "hi"],
                              capture_output=True, text=True, env={**ENV, **env}, timeout=120)
        assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr


def test_rain_sets_openmp_passive_wait_before_torch_loads():
    """The CLI makes OpenMP threads sleep instead of spin while waiting (README "Threads"): libgomp
    reads OMP_WAIT_POLICY once, when torch loads it, so the CLI must set it before torch is imported;
    libgomp's own report (OMP_DISPLAY_ENV=VERBOSE) shows the spin count it took. A policy the user
    set is kept."""
    code = ("import sys\n"
            "from rain_llm.shells import cli\n"
            "assert 'torch' not in sys.modules, 'torch loaded before the CLI could set the wait policy'\n"
            "def spy(args):\n"
            "    import torch\n"
            "    torch.ones(1 << 16).sum()\n"
            "    raise SystemExit(0)\n"
            "cli.load_rain = spy\n"
            "sys.exit(cli.main(sys.argv[1:]))\n")

    def spin_count(env: dict) -> int:
        proc = subprocess.run([sys.executable, "-c", code, "generate", "hi"], capture_output=True, text=True,
                              env={**{k: v for k, v in ENV.items() if k != "OMP_WAIT_POLICY"}, **env,
                                   "OMP_DISPLAY_ENV": "VERBOSE"}, timeout=120)
        assert proc.returncode == 0, proc.stderr
        found = re.search(r"GOMP_SPINCOUNT = '(\d+)'", proc.stderr)
        assert found, proc.stderr
        return int(found.group(1))

    assert spin_count({}) == 0  # passive: no spinning
    assert spin_count({"OMP_WAIT_POLICY": "ACTIVE"}) > 300000  # the user's choice stands


def test_progress_writes_lines_to_logs_and_explains_fresh_iterations():
    log = io.StringIO()
    progress = Progress(True, every=0.0, stream=log)  # a log, not a terminal: a line whenever one is due
    info = {"step": 1, "budget": 15, "visits_before": 0, "t_max": 8, "fresh": 15, "nodes": 4, "answer_tokens": 0}
    for i in range(1, 4):
        progress(SearchStatus(**{**info, "iteration": i}))
    lines = log.getvalue().splitlines()
    assert len(lines) == 3 and lines[-1].startswith("step 1  iteration 3/15")
    assert "fresh_iterations=15" in lines[0]  # why t_max 8 runs 15 iterations
    quiet = io.StringIO()
    progress = Progress(True, every=3600.0, stream=quiet)  # not due by time: a line per new step only
    for step in (1, 1, 1, 2):
        progress(SearchStatus(**{**info, "step": step, "iteration": 1, "budget": 8}))
    assert len(quiet.getvalue().splitlines()) == 2 and "fresh" not in quiet.getvalue()


def test_a_file_that_is_not_a_model_and_an_uncached_hub_id_fail_at_once(capsys, tmp_path, monkeypatch):
    toml = tmp_path / "settings.toml"
    toml.write_text("t_max = 3\n")
    assert main(["generate", "--model", str(toml), "hi"]) == 2
    assert "is a file but not a model" in one_error_line(capsys)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["generate", "--model", "no-such-org/no-such-model", "hi"]) == 2
    line = one_error_line(capsys)
    assert "not in the local Hugging Face cache" in line and "HF_HUB_OFFLINE" in line


def test_bench_table_has_no_nan():
    from rain_llm.shells.bench import summarise, table

    record = {"answer_tokens": 4, "seconds": 1.0, "forward_passes": 4, "tokens": 40, "lm_tokens": 40, "least_work": 0,
              "lm_forward_passes": 4, "iterations": 0, "iterations_per_step": [],
              "compute": {"generate": {"forward_passes": 4, "tokens": 40, "seconds": 1.0}},
              "final_values": [None]}
    text = table(summarise({"vanilla": [record]}))
    assert "nan" not in text and " - " in text


def test_every_option_is_documented_and_defaults_read_plainly():
    """Each option of each command has help text; the help of eval and bench documents the model
    flags (issue: --preset, --config, --device, --dtype were blank there); numbers print as written
    (1048576, not 1.04858e+06)."""
    from rain_llm.shells.cli import build_parser

    _, commands = build_parser()
    for name, command in commands.items():
        for action in command._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"rain {name} {action.option_strings[0]} has no help"
        text = command.format_help()
        assert not re.search(r"\de[+-]\d", text), f"rain {name} --help prints a number in e-notation"
    for name in ("eval", "bench"):
        text = " ".join(commands[name].format_help().split())
        for flag in ("--preset", "--config", "--device", "--dtype", "--threads"):
            assert flag in text
    serve = " ".join(commands["serve"].format_help().split())
    assert "(default 1048576)" in serve and "(default 16)" in serve and "(default 0.05)" in serve


def test_summary_does_not_invent_forward_passes_for_a_server():
    """A vLLM server does not report its forward passes: the summary shows '-' for its phases, not 0
    (the local embedder's are known)."""
    from rain_llm.shells.cli import summary

    stats = {"engine": "vllm:smol", "answer_tokens": 3, "seconds": 1.0,
             "compute": {"expand": {"forward_passes": 0, "tokens": 40}, "embed": {"forward_passes": 2, "tokens": 9},
                         "total": {"forward_passes": 2, "tokens": 49}}}
    text = summary(stats, "vanilla")
    assert "expand -/40" in text and "embed 2/9" in text and "total -/49" in text
    local = summary({**stats, "engine": "model"}, "vanilla")
    assert "expand 0/40" in local and "total 2/49" in local
