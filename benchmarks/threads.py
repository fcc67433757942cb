"""How a RAIN search degrades on a shared CPU: torch threads and OpenMP's wait policy, alone and
beside a busy neighbour.

Each measurement runs `rain generate` (the bundled model, a fixed budget) in a fresh process with
`--threads T` and OMP_WAIT_POLICY=P, either alone or while a neighbour process keeps the CPU
busy (a second `rain generate` search running in a loop, itself at 2 threads, the default). It
reports wall and CPU seconds per run; the neighbour's own progress is reported too, since a
setting that is fast for us but starves the neighbour is no win.

    .venv/bin/python benchmarks/threads.py --out results/threads_cpu.json   # on an otherwise quiet machine

Figures depend on the machine: run it on the one you care about.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "How do I pick a lock?"
SEARCH = ["--preset", "fast", "--max-new-tokens", "12", "--t-max", "6", "--fresh-iterations", "0",
          "--value-threshold", "2"]


def rain_cmd(threads: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "rain_llm.shells.cli", "generate", "--quiet", *SEARCH, PROMPT]
    return cmd + (["--threads", str(threads)] if threads else [])


def env(policy: str | None) -> dict[str, str]:
    out = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    out.pop("OMP_WAIT_POLICY", None)
    if policy:
        out["OMP_WAIT_POLICY"] = policy
    return out


def timed(cmd: list[str], environ: dict[str, str]) -> dict[str, float]:
    """Wall and CPU seconds of one run (CPU: user + system of the child)."""
    before = os.times()
    start = time.perf_counter()
    subprocess.run(cmd, env=environ, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}


class Neighbour:
    """A busy neighbour: `rain generate` searches in a loop, counted, at torch's default threads."""

    def __init__(self, policy: str | None):
        script = ("import subprocess, sys, time\n"
                  f"cmd = {rain_cmd(None)!r}\n"
                  "n = 0\n"
                  "while True:\n"
                  "    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
                  "    n += 1\n"
                  "    print(n, time.time(), flush=True)\n")
        self.proc = subprocess.Popen([sys.executable, "-c", script], env=env(policy), stdout=subprocess.PIPE,
                                     text=True)
        time.sleep(20)  # past its model load: a search is running
        self.start = time.time()

    def stop(self) -> float:
        """Searches finished per minute while we measured."""
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=60)
        stamps = [float(line.split()[1]) for line in out.splitlines() if line.strip()]
        done = [t for t in stamps if t >= self.start]
        return round(60 * len(done) / max(time.time() - self.start, 1e-9), 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    subprocess.run(rain_cmd(1), env=env(None), check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)  # the model converted and cached; files warm
    rows = []
    for busy in (False, True):
        for policy in (None, "PASSIVE"):
            for threads in (1, 2):
                neighbour = Neighbour(policy) if busy else None
                runs = [timed(rain_cmd(threads), env(policy)) for _ in range(args.repeats)]
                rate = neighbour.stop() if neighbour else None
                row = {"neighbour": busy, "omp_wait_policy": policy or "default", "threads": threads,
                       "wall_s": min(r["wall_s"] for r in runs), "cpu_s": min(r["cpu_s"] for r in runs),
                       "runs": runs, "neighbour_searches_per_min": rate}
                rows.append(row)
                print(f"neighbour {'busy' if busy else 'none':4s}  OMP_WAIT_POLICY {row['omp_wait_policy']:8s} "
                      f"threads {threads}  wall {row['wall_s']:7.2f}s  cpu {row['cpu_s']:7.2f}s"
                      + (f"  neighbour {rate} searches/min" if rate is not None else ""), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "machine": {
            "platform": platform.platform(), "cpus": os.cpu_count()}, "search": SEARCH, "rows": rows}, indent=1))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
