"""What steers RAIN is pluggable, and it really steers."""

from __future__ import annotations

import pytest

from rain_llm import Rain, RainError, load_config


@pytest.fixture(scope="module")
def rain(default_model_dir):
    return Rain.load()


def cfg(**kw):
    return load_config("fast", max_new_tokens=kw.pop("max_new_tokens", 4), t_max=6, t_min=1, **kw)


def test_callable_value_steers_away_from_greedy(rain):
    prompt = "Name a colour."
    greedy = rain.generate(prompt, cfg(method="vanilla"))
    first = rain.engine.decode(greedy.token_ids[:1]).strip()
    seen = []

    def value(p: str, response: str) -> float:
        seen.append(response)
        return -1.0 if response.startswith(first) else 1.0

    out = rain.generate(prompt, cfg(), value_fn=value)
    assert greedy.text.startswith(first) and seen
    assert not out.text.startswith(first)  # the value made the search leave the greedy answer


def test_lexicon_values_and_bad_spec(rain):
    out = rain.generate("The film opened with", cfg(value="vader"))
    assert out.token_ids and out.stats["iterations"] > 0
    with pytest.raises(RainError, match="value"):
        load_config(value="magic")


def test_judge_model_value_counts_its_compute(rain, default_model_dir):
    out = rain.generate("Say hello.", cfg(value=f"judge:{default_model_dir}"))
    assert out.stats["compute"]["evaluate"]["tokens"] > 0


def test_reward_model_value(rain, tmp_path, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=1, num_attention_heads=2,
                                                       num_key_value_heads=1, num_labels=1,
                                                       pad_token_id=tokenizer.eos_token_id))
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    out = rain.generate("Say hello.", cfg(value=f"reward:{tmp_path / 'rm'}"))
    assert out.token_ids
    with pytest.raises(RainError, match="reward model"):
        rain.generate("Say hello.", cfg(value=f"reward:{tmp_path / 'missing'}"))
