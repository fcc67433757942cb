"""The search: RAIN's tree over token sets as a generator of typed requests (numpy only)."""

from rain_llm.search.rain import Node, RainSearch, SearchEnv, SearchResult, SearchStats, StepRecord
from rain_llm.search.requests import (
    Candidates,
    Checkpoint,
    Commit,
    Complete,
    EmbedSpans,
    Expand,
    ExpandJob,
    Expansion,
    Propose,
    SearchRequest,
    SearchStatus,
    Tokens,
    Value,
)

__all__ = ["RainSearch", "SearchEnv", "SearchResult", "SearchStats", "StepRecord", "Node", "SearchStatus",
           "Tokens", "Candidates", "ExpandJob", "Expansion", "Expand", "Propose", "Value", "EmbedSpans", "Complete",
           "Commit", "Checkpoint", "SearchRequest"]
