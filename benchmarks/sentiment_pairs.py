"""Sentiment pairs for the self-evaluation pre-flight (`rain eval selfeval --data ...`), built offline.

The policy model continues each review opening of the sentiment task (the task's own prompt:
"Continue this movie review: ..."), `--samples` times by plain sampling (temperature 1, whole
vocabulary, this script's seed), exactly the answers `rain eval sentiment` would sample from it.
Each continuation is scored by VADER and AFINN; a pair is a continuation both call positive and one
both call negative, of the same opening (`rain_llm.evaluation.pairs`). Openings alternate between
two halves: `pairs-screen.jsonl` (even positions: choose templates and settings there) and
`pairs-heldout.jsonl` (odd positions: scored once, with what the screen chose).

    .venv/bin/python benchmarks/sentiment_pairs.py --model qwen2.5-coder-1.5b --dtype bfloat16 \\
        --threads 2 --out results/eval/selfsteer

Resumable: continuations are appended per opening (`continuations.jsonl`) and openings already there
are skipped; the pairs files are rebuilt from it at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def read_continuations(path: Path) -> list[dict]:
    """The continuations written so far; a last line cut by a kill is dropped from the file (its opening
    is sampled again)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        path.write_bytes(data)
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--samples", type=int, default=16, help="continuations per opening (default 16)")
    ap.add_argument("--max-new-tokens", type=int, default=24, help="as the sentiment runs (default 24)")
    ap.add_argument("--openings", type=int, default=None, help="first N openings (default all)")
    ap.add_argument("--together", type=int, default=2, help="openings sampled in one batch (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/eval/selfsteer", help="folder for the files")
    args = ap.parse_args(argv)

    from rain_llm import Rain, load_config
    from rain_llm.errors import RainError
    from rain_llm.evaluation.data import load_examples, select
    from rain_llm.evaluation.harness import task_prompt
    from rain_llm.evaluation.pairs import lexicon_scores, sentiment_pairs
    from rain_llm.runtime.backend import Row, SampleRows
    from rain_llm.runtime.scheduler import run_requests
    from rain_llm.shells.cli import set_threads

    try:
        if args.samples < 2 or args.max_new_tokens < 1 or args.together < 1:
            raise RainError("--samples must be at least 2, --max-new-tokens and --together at least 1")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "continuations.jsonl"
        have: dict[str, int] = {}  # continuations per opening so far (a rerun with more --samples adds to them)
        for row in read_continuations(path):
            have[row["opening"]] = have.get(row["opening"], 0) + 1
        examples = select(load_examples("sentiment"), limit=args.openings)
        todo = [(i, ex) for i, ex in enumerate(examples) if have.get(ex.id, 0) < args.samples]
        set_threads(args.threads)
        rain = Rain.load(args.model, dtype=args.dtype) if todo else None
        cfg = load_config("fast", max_new_tokens=args.max_new_tokens, seed=args.seed)
        start = time.perf_counter()
        for chunk in range(0, len(todo), args.together):
            batch = todo[chunk: chunk + args.together]
            requests, formats = [], []
            for i, ex in batch:
                fmt, context = rain.prepare(task_prompt("sentiment", ex), cfg)
                first = have.get(ex.id, 0)
                rows = [Row(args.max_new_tokens, 1.0, 0) for _ in range(first, args.samples)]
                # one stream per opening, sample k from its k-th row of draws whatever the batching and
                # however many samples were asked for before (the tokens can still differ where batch
                # shapes change the logits in the last bits and a draw falls on a boundary: seen once in 27)
                uniforms = np.random.default_rng([args.seed, i]).random((args.samples, args.max_new_tokens))
                requests.append(SampleRows(ex.id, "generate", context, rows, uniforms[first:]))
                formats.append(fmt)
            results = run_requests(rain.backend, requests)
            lines = []
            for (i, ex), fmt, samples in zip(batch, formats, results):
                texts = [fmt.clean(rain.codec.decode(s.tokens)) for s in samples]
                for k, (text, (vader, afinn)) in enumerate(zip(texts, lexicon_scores(texts)), have.get(ex.id, 0)):
                    lines.append({"opening": ex.id, "position": i, "prompt": task_prompt("sentiment", ex),
                                  "sample": k, "text": text, "vader": vader, "afinn": afinn,
                                  "model": rain.name, "temperature": 1.0, "top_k": 0,
                                  "max_new_tokens": args.max_new_tokens, "seed": args.seed})
            with path.open("a") as f:
                f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
                f.flush()
                os.fsync(f.fileno())
            print(f"{chunk + len(batch)}/{len(todo)} openings, {time.perf_counter() - start:.0f} s", file=sys.stderr)
        # the pairs: from the first --samples continuations of each of these openings that has them all
        wanted = {ex.id for ex in examples}
        rows = [r for r in read_continuations(path) if r["opening"] in wanted and r["sample"] < args.samples]
        count = {o: sum(r["opening"] == o for r in rows) for o in wanted}
        rows = sorted((r for r in rows if count[r["opening"]] == args.samples),
                      key=lambda r: (r["position"], r["sample"]))
        pairs = sentiment_pairs(rows)
        position = {r["opening"]: r["position"] for r in rows}
        halves = {"screen": [p for p in pairs if position[p["opening"]] % 2 == 0],
                  "heldout": [p for p in pairs if position[p["opening"]] % 2 == 1]}
        for name, half in halves.items():
            (out / f"pairs-{name}.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in half))
        from rain_llm.evaluation.pairs import lexicon_label

        labels = [lexicon_label(r["vader"], r["afinn"]) for r in rows]
        print(f"{len(rows)} continuations of {len(position)} openings: {labels.count('positive')} positive, "
              f"{labels.count('negative')} negative, {labels.count(None)} unlabelled (lexicons disagree or near 0); "
              f"pairs: {len(halves['screen'])} screen, {len(halves['heldout'])} held out")
    except RainError as err:
        print(f"sentiment_pairs: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
