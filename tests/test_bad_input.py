"""Every bad input gets one clear line on stderr, a non-zero exit, and nothing half-written."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rain_llm.config import RainConfig, load_config
from rain_llm.errors import RainError
from rain_llm.shells.cli import main
from rain_llm.values.templates import load_template


def run(capsys, *args):
    code = main(["generate", *args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def assert_one_line_error(code, err, *words):
    assert code == 2
    errors = [line for line in err if line.startswith("rain: error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in "\n".join(err)
    for w in words:
        assert w in errors[0], errors[0]


@pytest.mark.parametrize("prompt", ["", "   \n\t "])
def test_empty_prompt(capsys, prompt):
    assert_one_line_error(*run(capsys, "--method", "vanilla", prompt), "empty prompt")


def test_prompt_longer_than_context(capsys, default_model_dir):
    assert_one_line_error(*run(capsys, "--method", "vanilla", "word " * 9000), "prompt too long", "context window")


def test_unknown_model_path(capsys):
    assert_one_line_error(*run(capsys, "--model", "/no/such/model-folder", "hi"), "/no/such/model-folder")


def test_folder_without_config(capsys, tmp_path):
    assert_one_line_error(*run(capsys, "--model", str(tmp_path), "hi"), "config.json")


def test_unknown_hub_id_offline(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "no-such-org/no-such-model-xyz"
    assert_one_line_error(*run(capsys, "--model", name, "hi"), name)


def test_unreadable_gguf(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("RAIN_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    assert_one_line_error(*run(capsys, "--model", str(bad), "hi"), "cannot read GGUF file", "broken.gguf")
    assert not any((tmp_path / "cache").rglob("*.safetensors"))  # nothing half-converted left behind


@pytest.mark.parametrize("flags,words", [
    (["--c-puct", "-1"], ["c_puct"]),
    (["--t-min", "9", "--t-max", "3"], ["t_min", "t_max"]),
    (["--num-candidates", "0"], ["num_candidates"]),
    (["--preset", "no-such-preset"], ["unknown preset"]),
    (["--template", "no-such-template"], ["unknown template"]),
    (["--value-mode", "median"], ["value_mode"]),
    (["--token-set-lengths", "1,0"], ["token_set_lengths"]),
])
def test_invalid_config_values(capsys, flags, words, default_model_dir):
    assert_one_line_error(*run(capsys, *flags, "--max-new-tokens", "2", "hi"), *words)


@pytest.mark.parametrize("flags,words", [
    (["--speculate", "-1"], ["invalid speculate -1"]),
    (["--speculate", "4", "--engine", "vllm", "--engine-url", "http://127.0.0.1:9"], ["--speculate",
                                                                                      "transformers engine only"]),
])
def test_speculation_that_cannot_run(capsys, flags, words):
    """Refused before any model loads or any server is asked."""
    assert_one_line_error(*run(capsys, *flags, "hi"), *words)


def test_unknown_key_in_config_file(capsys, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("t_max = 4\nno_such_key = 1\n")
    assert_one_line_error(*run(capsys, "--config", str(cfg), "hi"), "unknown config key", "no_such_key")


def test_wrong_type_in_config_file(capsys, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('t_max = "many"\n')
    assert_one_line_error(*run(capsys, "--config", str(cfg), "hi"), "t_max")


def test_config_file_not_toml(capsys, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("t_max = = 4\n")
    assert_one_line_error(*run(capsys, "--config", str(cfg), "hi"), "not valid TOML")


def test_template_without_option_placeholders(capsys, tmp_path, default_model_dir):
    tpl = tmp_path / "t.toml"
    tpl.write_text('good = "fine"\nbad = "not fine"\ntemplate = "Human: {prompt}\\nAssistant: {response}\\nWhich?"\n')
    assert_one_line_error(*run(capsys, "--template", str(tpl), "--max-new-tokens", "2", "hi"),
                          "{option_a}", "{option_b}")


def test_nothing_half_written_on_error(capsys, tmp_path):
    trace = tmp_path / "trace.json"
    code, err = run(capsys, "--t-min", "9", "--t-max", "3", "--trace", str(trace), "hi")
    assert code == 2 and not trace.exists()


def test_subprocess_error_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "rain_llm.shells.cli", "generate", "--c-puct", "-2", "hi"],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["rain: error: invalid config value c_puct=-2.0: must not be negative"]
    assert proc.stdout == ""


def test_config_validation_in_python():
    with pytest.raises(RainError, match="t_min"):
        RainConfig(t_min=10, t_max=5).validate()
    with pytest.raises(RainError, match="temperature"):
        load_config(temperature=0.0)
    assert load_config("paper-advbench").temperature == 2.0
    assert load_config("paper-advbench").t_min == 5
    assert load_config("paper-truthfulqa").t_min == 16
    with pytest.raises(RainError, match="not valid TOML"):
        load_template(__file__)  # not a TOML template


def test_builtin_templates_load():
    for name in ("harmlessness", "truthfulness", "sentiment"):
        t = load_template(name)
        assert "{response}" in t.text and t.good != t.bad
