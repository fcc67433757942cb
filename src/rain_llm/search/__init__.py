"""The search: RAIN's tree over token sets as a generator of typed model requests (numpy only)."""

from rain_llm.search.rain import Node, ProgressFn, RainSearch, SearchEnv, SearchResult, SearchStats, StepRecord
from rain_llm.search.requests import (
    Candidates,
    Complete,
    EmbedSpans,
    Expand,
    ExpandJob,
    Expansion,
    Propose,
    SearchRequest,
    Tokens,
    Value,
)

__all__ = ["RainSearch", "SearchEnv", "SearchResult", "SearchStats", "StepRecord", "Node", "ProgressFn",
           "Tokens", "Candidates", "ExpandJob", "Expansion", "Expand", "Propose", "Value", "EmbedSpans", "Complete",
           "SearchRequest"]
