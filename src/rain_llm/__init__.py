"""rain-llm: RAIN (Rewindable Auto-regressive INference, Li et al., ICLR 2024) for any causal LM."""

from .api import Generation, Rain
from .config import PRESETS, RainConfig, load_config
from .errors import RainError
from .search import RainSearch, SearchEnv

__all__ = ["Rain", "Generation", "RainConfig", "load_config", "PRESETS", "RainError", "RainSearch", "SearchEnv"]
__version__ = "0.1.0"
