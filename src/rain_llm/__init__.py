"""rain-llm: RAIN (Rewindable Auto-regressive INference, Li et al., ICLR 2024) for any causal LM."""

from rain_llm.api import ContinuousBatch, Rain
from rain_llm.config import PRESETS, RainConfig, load_config
from rain_llm.errors import RainError
from rain_llm.runtime.answers import AnswerStats, Generation
from rain_llm.search import RainSearch, SearchEnv

__all__ = ["Rain", "ContinuousBatch", "Generation", "AnswerStats", "RainConfig", "load_config", "PRESETS",
           "RainError", "RainSearch", "SearchEnv"]
__version__ = "0.1.0"
