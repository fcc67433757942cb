"""Do a search's self-evaluation forwards ever share a scheduler step with its decoding? (issue 22)

Runs RAIN one prompt at a time (P = 1) on the default model and, for every scheduler step, notes which
kinds of backend work ran a forward of the language model. Prints the steps, the evaluation ("score")
forwards, and how many of them ran in a step that also decoded ("sample"): those are the ones a fused
score-and-decode forward could save.

    python benchmarks/eval_overlap.py --prompts 2 --out results/eval_overlap_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--t-max", type=int, default=12)
    ap.add_argument("--speculate", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from rain_llm import Rain, load_config
    from rain_llm.engine.hf.backend import HFBackend
    from rain_llm.runtime.scheduler import Scheduler
    from rain_llm.shells.bench import bench_prompts

    cfg = load_config("paper-hh", max_new_tokens=args.max_new_tokens, t_max=args.t_max, value_threshold=2.0,
                      fresh_iterations=0)
    rain = Rain.load(None, speculate=args.speculate)
    steps: list[dict[str, int]] = []
    current: dict[str, int] = {}
    execute, step = HFBackend.execute, Scheduler.step

    def counted_execute(self, batch):  # type: ignore[no-untyped-def]
        before = self.engine.forwards
        done = execute(self, batch)
        if self.engine.forwards > before:
            current[batch.kind] = current.get(batch.kind, 0) + self.engine.forwards - before
        return done

    def counted_step(self, *a, **k):  # type: ignore[no-untyped-def]
        current.clear()
        out = step(self, *a, **k)
        steps.append(dict(current))
        return out

    HFBackend.execute, Scheduler.step = counted_execute, counted_step  # type: ignore[method-assign]
    for prompt in bench_prompts(args.prompts):
        rain.generate_many([prompt], cfg)
    result = {
        "config": cfg.to_dict(), "speculate": args.speculate, "steps": len(steps),
        "forwards": {kind: sum(s.get(kind, 0) for s in steps) for kind in ("prefill", "sample", "score")},
        "score_forwards_in_steps_that_decoded": sum(s.get("score", 0) for s in steps if "sample" in s),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "config"}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
