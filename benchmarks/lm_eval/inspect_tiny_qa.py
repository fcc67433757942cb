"""The same ten questions as tiny_qa.yaml, for UK AISI's Inspect against `rain serve` (README
"Evaluation clients"): `inspect eval benchmarks/lm_eval/inspect_tiny_qa.py --model openai-api/rain/default`."""

from pathlib import Path

from inspect_ai import Task, task
from inspect_ai.dataset import FieldSpec, json_dataset
from inspect_ai.scorer import includes
from inspect_ai.solver import generate


@task
def tiny_qa() -> Task:
    data = Path(__file__).with_name("tiny_qa.jsonl")
    return Task(dataset=json_dataset(str(data), FieldSpec(input="question", target="answer")), solver=generate(),
                scorer=includes())
