"""Labelled answer pairs for `rain eval selfeval`, built without a human label: sentiment by two lexicons.

A self-evaluation check needs pairs whose better answer is known. For sentiment the policy's own
continuations of review openings are labelled by two independent lexicons, VADER (compound score) and
AFINN (sum of word scores): a continuation is positive or negative only when both say so clearly;
where they disagree, or either is near zero, it gets no label and is left out. A pair is one positive
and one negative continuation of the same opening (each continuation in one pair at most), so the
prompt is shared and the label is the lexicons', not the model's. Thresholds were fixed before any
continuation was sampled.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

VADER_CLEAR = 0.3  # |compound| at or above this: VADER says clearly positive / negative
AFINN_CLEAR = 2  # |AFINN sum| at or above this: at least one clearly loaded word, or several mild ones


def lexicon_label(vader: float, afinn: float) -> str | None:
    """"positive" or "negative" when both lexicons say so clearly; None when they disagree or either is
    near zero (no pair is built on a label one of them doubts)."""
    if vader >= VADER_CLEAR and afinn >= AFINN_CLEAR:
        return "positive"
    if vader <= -VADER_CLEAR and afinn <= -AFINN_CLEAR:
        return "negative"
    return None


def lexicon_scores(texts: Iterable[str]) -> list[tuple[float, float]]:
    """(VADER compound, AFINN sum) of each text."""
    from afinn import Afinn
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader, afinn = SentimentIntensityAnalyzer(), Afinn()
    return [(float(vader.polarity_scores(t)["compound"]), float(afinn.score(t))) for t in texts]


def sentiment_pairs(continuations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pairs from labelled continuations (dicts with opening, prompt, text, vader, afinn, sample), in
    the order the openings first appear: per opening, its k-th positive with its k-th negative."""
    by_opening: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for c in continuations:
        label = lexicon_label(c["vader"], c["afinn"])
        groups = by_opening.setdefault(str(c["opening"]), {"positive": [], "negative": []})
        if label is not None:
            groups[label].append(c)
    out = []
    for opening, groups in by_opening.items():
        for k, (pos, neg) in enumerate(zip(groups["positive"], groups["negative"])):
            out.append({"id": f"{opening}-pair{k}", "prompt": pos["prompt"], "chosen": pos["text"],
                        "rejected": neg["text"], "opening": opening,
                        "labelled_by": "VADER and AFINN agree: chosen positive, rejected negative",
                        "vader_chosen": pos["vader"], "afinn_chosen": pos["afinn"],
                        "vader_rejected": neg["vader"], "afinn_rejected": neg["afinn"],
                        "samples": [pos["sample"], neg["sample"]]})
    return out


__all__ = ["VADER_CLEAR", "AFINN_CLEAR", "lexicon_label", "lexicon_scores", "sentiment_pairs"]
