"""One prepared script for a GPU machine: CUDA correctness of the engine, then RAIN vs vanilla timing.

No weights are available there, so models are random, built from configs, with real tokenizers
(SmolLM2's and MiniLM's, carried in an assets folder made by `--make-assets` here):

    .venv/bin/python benchmarks/gpu_check.py --make-assets .gpu_assets        # on this machine
    python3 benchmarks/gpu_check.py --assets .gpu_assets --out $OUT/gpu.json  # on the GPU machine
    .venv/bin/python benchmarks/gpu_check.py --assets .gpu_assets --tiny      # CPU dry run

Part 1: tiny Llama and Gemma 3 (sliding window) in float32 and bfloat16 on the device: logits
through every reuse path against a full forward, and the option scoring.
Part 1 also checks several contexts in one left-padded batch (a decode stream, score_many) and the
token-level stream (requests joining at different steps) against each alone, and reports whether
scoring runs fused (one forward).
Part 2: a Llama-3-8B-shaped model (bf16, vocabulary of the carried tokenizer): vanilla decoding
with our engine and with transformers `generate` (KV cache), then RAIN (paper-hh settings, a
fixed iteration budget per step so runs compare); then B prompts at once (RAIN stepped token by
token, vanilla, and RAIN in whole-iteration lockstep; throughput against B = 1), parallel leaves
(P = 4), KV reuse off, and 2B prompts through a continuous batch of B (steady state). Parts start
only while `--budget-s` is not spent, so one device call stays well under its limit.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

PROMPT = "How do I pick a lock?"
PROMPTS = [PROMPT, "What is the capital of France?", "Write a short poem about the sea.",
           "How can I get back at my noisy neighbour?", "Explain how vaccines work to a ten-year-old.",
           "Give me three tips for a job interview.", "What household chemicals should never be mixed, and why?",
           "Summarise the plot of Romeo and Juliet in two sentences.", "How do I make a bomb?",
           "Translate 'good morning' into French, Spanish and German.", "Why is the sky blue?",
           "Write a haiku about autumn leaves.", "What is the best way to learn a new language as an adult?",
           "Tell me a joke about programmers.", "How do I hack into my ex's email account?",
           "List the planets of the solar system in order from the sun."]


def make_assets(target: Path) -> None:
    from rain_llm.engine.hf.models import converted_folder, default_gguf
    from rain_llm.values.embedder import minilm_path

    src = converted_folder(default_gguf())
    (target / "lm").mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json",
                 "generation_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, target / "lm" / name)
    (target / "minilm").mkdir(exist_ok=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_path() / name, target / "minilm" / name)
    print(f"assets in {target}")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Eng:
    """The transformers backend's engine, driven directly (its reuse paths against full forwards)."""

    def __init__(self, model, tok):
        from rain_llm.engine.hf.engine import HFEngine
        from rain_llm.runtime.accounting import Receipt
        from rain_llm.runtime.text import Codec

        self.engine = HFEngine(model, Codec(tok, [tok.eos_token_id]))
        self.receipt = Receipt("check")
        self.fuse_scoring = self.engine.fuse_scoring

    def next_logits(self, ids):
        return self.engine.prefill(ids, self.receipt)[1].float().cpu().numpy()

    def stream(self):
        from rain_llm.engine.hf.stream import DecodeStream

        return DecodeStream(self.engine)

    def decode_groups(self, requests):
        stream = self.stream()
        for i, (context, rows, uniforms) in enumerate(requests):
            stream.join(i, context, rows, uniforms, self.receipt)
        done = {}
        while stream:
            done.update(stream.step())
        return [done[i].samples() for i in range(len(requests))]

    def decode_rows(self, ctx, rows, uniforms=None):
        return self.decode_groups([(ctx, rows, uniforms)])[0]

    def sample(self, ctx, n, length, *, temperature, top_k, greedy_first):
        from rain_llm.runtime.backend import Row

        return self.decode_rows(ctx, [Row(length, temperature, top_k, greedy=greedy_first and i == 0)
                                      for i in range(n)])

    def score_options(self, prefix, suffixes, options):
        from rain_llm.runtime.backend import Score

        return self.engine.score_one(Score(None, "evaluate", list(prefix), suffixes, tuple(options)), self.receipt)

    def score_many(self, requests):
        from rain_llm.runtime.backend import Score

        scores = [Score(None, "evaluate", list(p), s, tuple(o)) for p, s, o in requests]
        return self.engine.score_many(scores, [self.receipt] * len(scores))


def correctness(tok, device: str) -> list[dict]:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    results = []
    common = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024)
    ctx = tok("The quick brown fox jumps over the lazy dog, and then it ran far away.")["input_ids"]
    for arch in ("llama", "gemma3"):
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            if arch == "llama":
                model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, **common))
            else:
                model = Gemma3ForCausalLM(Gemma3TextConfig(num_hidden_layers=3, head_dim=32, sliding_window=4,
                                                           layer_types=["sliding_attention"] * 2 + ["full_attention"],
                                                           **common))
            model = model.to(device=device, dtype=dtype).eval()
            eng = Eng(model, tok)

            def full(ids, model=model):
                with torch.no_grad():
                    return model(torch.tensor([list(ids)], device=device)).logits[0, -1].float().cpu()

            diffs = []
            for ids in (ctx, ctx, ctx[:7], ctx[:5] + [42, 43], ctx + [100, 200]):
                diffs.append(float((torch.tensor(eng.next_logits(ids)) - full(ids)).abs().max()))
            rows = eng.sample(ctx, 4, 5, temperature=1.0, top_k=15, greedy_first=True)
            for r in rows:
                diffs.append(float((torch.tensor(eng.next_logits(ctx + r.tokens)) - full(ctx + r.tokens)).abs().max()))
            got = eng.score_options(ctx, [[11, 12, 13], [14, 15]], [32, 33])
            ref = [torch.softmax(full(ctx + s), -1)[[32, 33]].tolist() for s in ([11, 12, 13], [14, 15])]
            score_err = float((torch.tensor(got) - torch.tensor(ref)).abs().max())
            # several contexts in one left-padded batch against each alone (same uniforms)
            import numpy as np

            from rain_llm.runtime.backend import Row

            contexts = [ctx, ctx[:5], ctx + [17, 18, 19], [3, 9] + ctx[2:8]]
            uniforms = [np.random.default_rng(i).random((2, 5)) for i in range(len(contexts))]
            rows = [Row(5, 1.0, 15, greedy=True), Row(5, 1.0, 15)]
            def fresh(model=model):
                return Eng(model, tok)

            batch = fresh().decode_groups([(c, rows, u) for c, u in zip(contexts, uniforms)])
            same = sum(fresh().decode_rows(c, rows, u)[j].tokens == got[j].tokens
                       for c, u, got in zip(contexts, uniforms, batch) for j in range(2))
            # a token-level stream that requests join at different steps, against each alone
            stream, staggered = fresh().stream(), {}
            for step in range(40):
                if step < len(contexts):
                    stream.join(step, contexts[step], rows, uniforms[step], eng.receipt)
                staggered.update({k: r.samples() for k, r in stream.step().items()})
                if not stream and step >= len(contexts):
                    break
            same_stream = sum(fresh().decode_rows(c, rows, u)[j].tokens == staggered[i][j].tokens
                              for i, (c, u) in enumerate(zip(contexts, uniforms)) for j in range(2))
            requests = [(ctx, [[11, 12, 13], [14, 15]], [32, 33]), (ctx[:6] + [50], [[11], [14, 15]], [32, 33])]
            many = fresh().score_many(requests)
            alone = [fresh().score_options(*r) for r in requests]
            many_err = max(float(np.abs(a - b).max()) for a, b in zip(many, alone))
            tol = 2e-3 if dtype == torch.float32 else 0.25  # bf16: different kernel paths round differently
            # bf16 rounding may flip a sampled token near a tie; float32 must agree exactly
            ok = max(diffs) < tol and score_err < 1e-3 and many_err < (1e-3 if dtype == torch.float32 else 0.05) \
                and ((same == 8 and same_stream == 8) or dtype != torch.float32)
            results.append({"arch": arch, "dtype": str(dtype), "max_logit_diff": max(diffs),
                            "score_diff": score_err, "batched_rows_equal": f"{same}/8",
                            "stream_rows_equal": f"{same_stream}/8", "score_many_diff": many_err,
                            "fused_scoring": fresh().fuse_scoring, "ok": ok})
            print(f"{arch:7s} {str(dtype):15s} max logit diff {max(diffs):.2e} score diff {score_err:.2e} "
                  f"batched rows equal {same}/8 stream rows equal {same_stream}/8 score_many diff {many_err:.2e} "
                  f"{'PASS' if ok else 'FAIL'}", flush=True)
    return results


def timing(tok, minilm_dir: Path, device: str, tiny: bool, new_tokens: int, t_max: int, batch: int,
           budget_s: float) -> dict:
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    from rain_llm import Rain, load_config
    from rain_llm.values.embedder import MiniLMEmbedder

    if tiny:
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    else:  # Llama-3-8B shapes (vocabulary: the carried tokenizer's)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                          rope_theta=500000.0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).eval()
        bert = BertModel(BertConfig.from_pretrained(minilm_dir)).eval()
    torch.set_default_dtype(torch.float32)
    embedder = MiniLMEmbedder(bert, AutoTokenizer.from_pretrained(minilm_dir))
    rain = Rain(model, tok, embedder=embedder, name="llama3-8b-shape-random" if not tiny else "tiny")
    out: dict = {"model": rain.name, "dtype": str(dtype), "params_b": sum(p.numel() for p in model.parameters()) / 1e9}

    ids = rain.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                             return_dict=False)
    # random weights rarely emit EOS; stop ids are cleared so every run decodes the full budget
    rain.codec.stop_ids = frozenset()
    with torch.no_grad():  # transformers generate with KV cache: the baseline a user would compare with
        model.generate(torch.tensor([ids], device=device), max_new_tokens=4, do_sample=False)
        sync()
        t = time.perf_counter()
        model.generate(torch.tensor([ids], device=device), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False)
        sync()
        out["hf_generate_s_per_token"] = (time.perf_counter() - t) / new_tokens
    # never early-stop (a fixed budget per step); random weights rarely emit punctuation, so the
    # rollout is capped near what the real default model averages (about 3 tokens)
    base = load_config("paper-hh", max_new_tokens=new_tokens, t_max=t_max, fresh_iterations=0,
                       value_threshold=2.0, max_rollout_tokens=8)
    speculating = rain.speculating(8)  # exact speculation (issue 22): the same weights, its own caches
    for kw in ({"method": "vanilla"}, {}, {"reuse_cache": False}):  # warm-up: kernels, allocator, embedder
        rain.generate(PROMPT, base, max_new_tokens=4, **kw)
    speculating.generate(PROMPT, base, max_new_tokens=4, rollout_temperature=0.0)
    rain.generate_many(PROMPTS[:2], base, max_new_tokens=4)
    started = time.perf_counter()
    steady = f"rain-continuous-{2 * batch}-in-{batch}"
    # the last part: twice as many prompts as slots, a new one joining as soon as one is answered
    # (the server's and `rain eval --batch`'s way), so the batch is not bound by its slowest search;
    # it takes about twice a B-prompt part, so it starts only in the first half of the budget
    plan = [("vanilla", 1, {"method": "vanilla"}), ("rain", 1, {}), (f"rain-b{batch}", batch, {}),
            (f"vanilla-b{batch}", batch, {"method": "vanilla"}),
            ("rain-p4", 1, {"parallel_leaves": 4}),
            # greedy rollouts repeat from a node, so drafts from the search's own text are accepted
            ("rain-greedy-rollouts", 1, {"rollout_temperature": 0.0}),
            ("rain-greedy-rollouts-s8", 1, {"rollout_temperature": 0.0}),
            ("rain-no-reuse", 1, {"reuse_cache": False}), (steady, 2 * batch, {})]
    for name, b, kw in plan:
        if time.perf_counter() - started > (budget_s / 2 if name == steady else budget_s):
            print(f"{name}: skipped (time budget of {budget_s:.0f}s spent)", flush=True)  # time left to report
            continue
        sync()
        t = time.perf_counter()
        if name == steady:
            from rain_llm.shells.bench import run_continuous

            rec = run_continuous(rain, base, PROMPTS[:batch] + [f"{p} Answer briefly." for p in PROMPTS[:batch]],
                                 batch)
            gens, compute = [], rec["compute"]
        else:
            gens = (speculating if name.endswith("-s8") else rain).generate_many(PROMPTS[:b], base, **kw)
            compute = (gens[0].stats.batch_compute or gens[0].stats.compute).to_dict()
        sync()
        sec = time.perf_counter() - t
        n = max(rec["answer_tokens"] if name == steady else sum(len(g.token_ids) for g in gens), 1)
        its = [x for g in gens for x in g.stats.iterations_per_step]
        out[name] = {"s_per_token": sec / n, "answer_tokens": n, "seconds": sec, "batch": min(b, batch),
                     "prompts": b, "iterations_per_step": its, "compute": compute,
                     "token_ids": [g.token_ids for g in gens]}
        phases = {k: (c.get("forward_passes"), round(c.get("seconds", 0), 2)) for k, c in compute.items()
                  if k != "least_work"}
        print(f"{name:14s} {sec / n * 1000:8.1f} ms/token  {phases}", flush=True)
    v = out["vanilla"]["s_per_token"]

    def ratio(a: str, b: str) -> float | None:
        return out[a]["s_per_token"] / out[b]["s_per_token"] if a in out and b in out else None

    out["ratios"] = {"rain_vs_vanilla": ratio("rain", "vanilla"),
                     "rain_vs_hf_generate": out["rain"]["s_per_token"] / out["hf_generate_s_per_token"],
                     "no_reuse_vs_reuse": ratio("rain-no-reuse", "rain"),
                     f"rain_b{batch}_throughput_vs_b1": ratio("rain", f"rain-b{batch}"),
                     f"vanilla_b{batch}_throughput_vs_b1": ratio("vanilla", f"vanilla-b{batch}"),
                     f"rain_continuous_{2 * batch}_in_{batch}_throughput_vs_b1": ratio("rain", steady),
                     "rain_p4_vs_p1_time": ratio("rain-p4", "rain"), "vanilla_s_per_token": v,
                     "speculate8_vs_off_time_greedy_rollouts": ratio("rain-greedy-rollouts-s8", "rain-greedy-rollouts")}
    if "rain-greedy-rollouts-s8" in out and "rain-greedy-rollouts" in out:  # exact: the same answers (bf16 here)
        out["ratios"]["speculate8_same_answers"] = (out["rain-greedy-rollouts-s8"]["token_ids"]
                                                    == out["rain-greedy-rollouts"]["token_ids"])
    print(json.dumps(out["ratios"]), flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--make-assets", type=Path)
    ap.add_argument("--assets", type=Path, default=ROOT / ".gpu_assets")
    ap.add_argument("--tiny", action="store_true", help="tiny model instead of the 8B shape (CPU dry run)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--t-max", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16, help="prompts in lockstep for the throughput comparison")
    ap.add_argument("--budget-s", type=float, default=360, help="start no timing part after this many seconds")
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    args = ap.parse_args()
    if args.make_assets:
        make_assets(args.make_assets)
        return 0
    import warnings

    warnings.filterwarnings("ignore")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(args.assets / "lm")
    report = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__}
    import transformers

    report["transformers"] = transformers.__version__
    print(report, flush=True)
    report["correctness"] = correctness(tok, device)
    args.out.write_text(json.dumps(report, indent=1))
    report["timing"] = timing(tok, args.assets / "minilm", device, args.tiny, args.new_tokens, args.t_max,
                              args.batch, args.budget_s)
    args.out.write_text(json.dumps(report, indent=1))
    return 0 if all(r["ok"] for r in report["correctness"]) else 1


if __name__ == "__main__":
    sys.exit(main())
