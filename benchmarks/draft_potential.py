"""How much of a RAIN search's decoding could exact speculation from the tree's own text skip? (issue 22)

Runs real searches on the default model and, for every decoded row (a sampled token set, a rollout),
looks up the draft the search's own earlier text offers (the longest sequence this answer already
produced that extends the row's context: an earlier rollout or token set) and counts how many of the
row's tokens the draft predicts exactly (the longest common prefix: what an exact verifier would
accept, since the row's tokens are fixed by its own uniforms). Nothing in the search changes; this
only measures. Prints per row kind: rows, tokens decoded, rows with a draft, tokens a draft covers, and
the sequential decode steps an expansion would take without and with one verifying forward.

    python benchmarks/draft_potential.py --prompts 3 --max-new-tokens 16 --t-max 12 --out draft.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def lcp(a: list[int], b: list[int]) -> int:
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n


class History:
    """The sequences (tokens after the prompt) one answer's search has produced so far."""

    def __init__(self) -> None:
        self.seqs: list[tuple[int, ...]] = []

    def draft(self, context: tuple[int, ...]) -> list[int]:
        best: tuple[int, ...] = ()
        for seq in self.seqs:
            if len(seq) > len(context) and seq[:len(context)] == context and len(seq) > len(best):
                best = seq
        return list(best[len(context):])

    def add(self, seq: tuple[int, ...]) -> None:
        self.seqs.append(seq)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--t-max", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rollout-temperature", type=float, default=1.0, help="0: greedy rollouts (an opt-in)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from rain_llm import Rain, load_config
    from rain_llm.runtime import rain_env
    from rain_llm.shells.bench import bench_prompts

    stats: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    steps = {"without": 0, "with": 0}
    histories: dict[int, History] = {}
    original = rain_env.RainEnv._expand

    def expand(self, jobs):  # type: ignore[no-untyped-def]
        results = yield from original(self, jobs)
        history = histories.setdefault(id(self), History())
        for job, result in zip(jobs, results):
            context = tuple(job.answer)
            rows = [("rollout", list(result.rollout))] if result.rollout else []
            rows += [("token set", list(tokens)) for tokens, _ in result.candidates if len(tokens) > 1]
            longest_without = longest_with = 0
            for kind, tokens in rows:
                draft = history.draft(context)
                covered = lcp(draft, tokens)
                s = stats[kind]
                s["rows"] += 1
                s["tokens"] += len(tokens)
                s["rows_with_draft"] += bool(draft)
                s["covered"] += covered
                s["fully_covered_rows"] += covered >= len(tokens)
                longest_without = max(longest_without, len(tokens))
                # one forward verifies the draft and yields the next token too; then one step per token
                longest_with = max(longest_with, len(tokens) - covered if covered else len(tokens))
            steps["without"] += longest_without
            steps["with"] += longest_with
            for _, tokens in rows:
                history.add(context + tuple(tokens))
        return results

    rain_env.RainEnv._expand = expand  # type: ignore[method-assign]
    rain = Rain.load()
    cfg = load_config("paper-hh", max_new_tokens=args.max_new_tokens, t_max=args.t_max, value_threshold=2.0,
                      fresh_iterations=0, rollout_temperature=args.rollout_temperature)
    iterations = 0
    for prompt in bench_prompts(args.prompts):
        out = rain.generate(prompt, cfg)
        iterations += out.stats.iterations
        print(f"{len(out.token_ids)} tokens, {out.stats.iterations} iterations: {out.text[:60]!r}", file=sys.stderr)
    report = {"config": cfg.to_dict(), "iterations": iterations, "rows": {k: dict(v) for k, v in stats.items()},
              "sequential_decode_steps": steps}
    for kind, s in stats.items():
        print(f"{kind:9s} rows {s['rows']:5d}  tokens {s['tokens']:6d}  with a draft {s['rows_with_draft']:5d}  "
              f"tokens a draft covers {s['covered']:6d} ({s['covered'] / max(s['tokens'], 1):.0%})  "
              f"rows fully covered {s['fully_covered_rows']}")
    print(f"decode steps of the expansions (their longest row): {steps['without']} without, at most {steps['with']} "
          f"with a verifying forward; {iterations} iterations")
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
