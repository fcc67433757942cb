"""Sentiment pairs labelled by two lexicons (rain_llm.evaluation.pairs), with the real lexicons."""

from __future__ import annotations

from rain_llm.evaluation.pairs import lexicon_label, lexicon_scores, sentiment_pairs


def test_a_label_needs_both_lexicons_clearly():
    assert lexicon_label(0.6, 3) == "positive" and lexicon_label(-0.6, -3) == "negative"
    assert lexicon_label(0.6, -3) is None  # they disagree
    assert lexicon_label(0.1, 5) is None and lexicon_label(0.9, 1) is None  # one of them near zero
    assert lexicon_label(0.3, 2) == "positive" and lexicon_label(-0.3, -2) == "negative"  # the thresholds count


def test_real_lexicons_label_plain_reviews():
    texts = ["A wonderful, moving film with brilliant acting. I loved it.",
             "A terrible, boring mess. I hated every awful minute.",
             "The film is ninety minutes long and was shot in Ohio."]
    labels = [lexicon_label(v, a) for v, a in lexicon_scores(texts)]
    assert labels == ["positive", "negative", None]


def test_pairs_match_positives_with_negatives_of_the_same_opening():
    def c(opening: str, sample: int, vader: float, afinn: float) -> dict:
        return {"opening": opening, "prompt": f"Continue: {opening}", "sample": sample, "text": f"{opening}/{sample}",
                "vader": vader, "afinn": afinn}

    rows = [c("o1", 0, 0.8, 4), c("o1", 1, -0.7, -3), c("o1", 2, 0.9, 5), c("o1", 3, 0.5, -2),  # 2 pos, 1 neg
            c("o2", 0, -0.8, -4), c("o2", 1, -0.5, -2),  # no positive: no pair
            c("o3", 0, -0.9, -6), c("o3", 1, 0.6, 2), c("o3", 2, -0.4, -3), c("o3", 3, 0.7, 3)]
    pairs = sentiment_pairs(rows)
    assert [(p["id"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("o1-pair0", "o1/0", "o1/1"), ("o3-pair0", "o3/1", "o3/0"), ("o3-pair1", "o3/3", "o3/2")]
    assert pairs[0]["prompt"] == "Continue: o1" and pairs[0]["samples"] == [0, 1]
    used = [s for p in pairs for s in (p["chosen"], p["rejected"])]
    assert len(used) == len(set(used))  # a continuation is in one pair at most
