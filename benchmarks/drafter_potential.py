"""Could a small draft model of the same tokenizer make RAIN's decoding exact-speculative? (issue 22)

The search's own text predicts almost none of what it decodes (benchmarks/draft_potential.py: 1%), so
this measures the other source of drafts before anyone builds the verifier: a smaller model of the same
family drafting with the *same* per-position uniforms as the row it drafts for. Every row of the engine
draws its step-s token by inverse CDF with its uniform u[s] (`engine.hf.stream.sample`), so a draft
token is accepted exactly when the target, at that position, would have drawn the same token from the
same uniform; a verifier accepts the longest such prefix and takes the target's own next token (exact
by construction: the answer is the same with speculation on or off).

Runs real RAIN searches on the target model, records every expansion's rows (the sampled token sets and
the rollout, with their contexts, sampling rules and uniforms), then feeds each row to the drafter in
one teacher-forced forward and asks, position by position, whether its pick from u[s] equals the row's
token. The target is also fed each row the same way: a verifier reads the target's logits from one
forward over the draft, and a pick that differs from the decoded token there is a place where
verification would not be exact (floating point: the batch's shape changes the logits' last bits).
Prints, per row kind, the acceptance rate and what speculation with k draft tokens per verifying forward
would need in sequential target forwards (and drafter steps) per expansion, against plain decoding.

    python benchmarks/drafter_potential.py --target qwen2.5-coder-1.5b --drafter qwen2.5-coder-0.5b \
        --prompts 2 --out results/drafter_potential_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def verify_rounds(matches: list[bool], k: int) -> tuple[int, int]:
    """Sequential target forwards and drafter steps to produce a row whose draft positions match as
    `matches` says, drafting k tokens per round: each round's verifying forward accepts the longest
    matching prefix of its k drafts and adds the target's own next token."""
    pos = rounds = drafted = 0
    while pos < len(matches):
        accepted = 0
        while accepted < k and pos + accepted < len(matches) and matches[pos + accepted]:
            accepted += 1
        rounds += 1
        drafted += k
        pos += accepted + 1
    return rounds, drafted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="qwen2.5-coder-1.5b")
    ap.add_argument("--drafter", default="qwen2.5-coder-0.5b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--t-max", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ks", default="2,4,8", help="draft lengths to simulate")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from rain_llm import Rain, load_config
    from rain_llm.engine.hf.stream import sample
    from rain_llm.runtime import rain_env
    from rain_llm.shells.bench import bench_prompts

    ks = [int(k) for k in args.ks.split(",")]
    expansions: list[dict[str, Any]] = []  # per expansion: its rows (kind, context, tokens, rule, uniforms)
    drawn: list[np.ndarray] = []
    raw: list[Any] = []
    original_uniforms, original_read, original_expand = (rain_env.RainEnv.uniforms, rain_env.RainEnv._read_candidates,
                                                         rain_env.RainEnv._expand)

    def uniforms(self, rows):  # type: ignore[no-untyped-def]
        u = original_uniforms(self, rows)
        drawn.append(u)
        return u

    def read_candidates(self, result, length, n):  # type: ignore[no-untyped-def]
        raw.append(result)
        return original_read(self, result, length, n)

    def expand(self, jobs):  # type: ignore[no-untyped-def]
        drawn.clear()
        raw.clear()
        results = yield from original_expand(self, jobs)
        draws, samples = list(drawn), list(raw)
        cfg = self.cfg
        for job, result in zip(jobs, results):
            ctx = self._ctx(job.answer)
            length = self._clip(job.answer, job.length)
            has_rollout = self._rollout_row(job.answer) is not None
            rows = []
            got = samples.pop(0)
            if length > 1 or has_rollout:
                u = draws.pop(0)
            if length > 1:
                for r, s in enumerate(got):
                    rows.append({"kind": "token set", "context": ctx, "tokens": list(s.tokens), "u": u[r],
                                 "temperature": cfg.temperature, "top_k": cfg.top_k, "greedy": r == 0})
            if has_rollout and result.rollout:
                rows.append({"kind": "rollout", "context": ctx, "tokens": list(result.rollout), "u": u[-1],
                             "temperature": cfg.rollout_temperature or 1.0, "top_k": 0,
                             "greedy": cfg.rollout_temperature == 0})
            expansions.append({"rows": rows})
        return results

    rain_env.RainEnv.uniforms = uniforms  # type: ignore[method-assign]
    rain_env.RainEnv._read_candidates = read_candidates  # type: ignore[method-assign]
    rain_env.RainEnv._expand = expand  # type: ignore[method-assign]
    target = Rain.load(args.target, dtype=args.dtype)
    cfg = load_config(args.preset, max_new_tokens=args.max_new_tokens, t_max=args.t_max, value_threshold=2.0,
                      fresh_iterations=0)
    start = time.perf_counter()
    iterations = 0
    for prompt in bench_prompts(args.prompts):
        out = target.generate(prompt, cfg)
        iterations += out.stats.iterations
        print(f"{len(out.token_ids)} tokens, {out.stats.iterations} iterations, {time.perf_counter() - start:.0f} s: "
              f"{out.text[:60]!r}", file=sys.stderr)
    drafter = Rain.load(args.drafter, dtype=args.dtype)
    probe = "Hello, world: a probe of both tokenizers."
    if target.codec.encode(probe) != drafter.codec.encode(probe):
        sys.exit(f"{args.drafter} does not share {args.target}'s tokenizer")

    def picks(model: Any, row: dict[str, Any]) -> list[int]:
        """The model's inverse-CDF pick at each of the row's positions, teacher-forced on its tokens."""
        ids = torch.tensor([row["context"] + row["tokens"][:-1]])
        with torch.inference_mode():
            logits = model(input_ids=ids).logits[0, len(row["context"]) - 1:].float()
        n = len(row["tokens"])
        u = torch.from_numpy(np.asarray(row["u"][:n], dtype=np.float64))
        tokens, _ = sample(logits, row["temperature"], row["top_k"], u, torch.full((n,), row["greedy"]))
        return [int(t) for t in tokens]

    kinds: dict[str, dict[str, int]] = {}
    steps = {"plain": 0, **{f"k{k}": 0 for k in ks}, **{f"k{k}_drafter": 0 for k in ks}}
    for e in expansions:
        longest = {"plain": 0, **{f"k{k}": 0 for k in ks}, **{f"k{k}_drafter": 0 for k in ks}}
        for row in e["rows"]:
            if not row["tokens"]:
                continue
            drafted = picks(drafter.model, row)
            verified = picks(target.model, row)
            matches = [d == t for d, t in zip(drafted, row["tokens"])]
            s = kinds.setdefault(row["kind"], {"rows": 0, "tokens": 0, "accepted": 0, "first_accepted": 0,
                                               "target_refeed_differs": 0})
            s["rows"] += 1
            s["tokens"] += len(matches)
            s["accepted"] += sum(matches)
            s["first_accepted"] += bool(matches[0])
            s["target_refeed_differs"] += sum(v != t for v, t in zip(verified, row["tokens"]))
            longest["plain"] = max(longest["plain"], len(matches))
            for k in ks:
                rounds, drafted_steps = verify_rounds(matches, k)
                s[f"k{k}_forwards"] = s.get(f"k{k}_forwards", 0) + rounds
                longest[f"k{k}"] = max(longest[f"k{k}"], rounds)
                longest[f"k{k}_drafter"] = max(longest[f"k{k}_drafter"], drafted_steps)
        for key in steps:
            steps[key] += longest[key]
    report = {"target": args.target, "drafter": args.drafter, "dtype": args.dtype, "config": cfg.to_dict(),
              "prompts": args.prompts, "iterations": iterations, "expansions": len(expansions), "rows": kinds,
              "sequential_steps_per_expansion_sum": steps}
    for kind, s in kinds.items():
        per_k = "  ".join(f"k={k}: {s[f'k{k}_forwards']} forwards" for k in ks)
        print(f"{kind:9s} rows {s['rows']:4d}  tokens {s['tokens']:5d}  drafter agrees {s['accepted']:5d} "
              f"({s['accepted'] / max(s['tokens'], 1):.0%})  "
              f"first token {s['first_accepted'] / max(s['rows'], 1):.0%}  "
              f"plain {s['tokens']} forwards  {per_k}  target re-fed differs {s['target_refeed_differs']}")
    print(f"expansions {len(expansions)}, iterations {iterations}: sequential target forwards (the longest row of "
          f"each expansion, summed) plain {steps['plain']}, " +
          ", ".join(f"k={k}: {steps[f'k{k}']} (+{steps[f'k{k}_drafter']} drafter steps)" for k in ks))
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
