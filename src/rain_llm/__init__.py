"""rain-llm: RAIN (Rewindable Auto-regressive INference, Li et al., ICLR 2024) for any causal LM.

The public names load on first use (PEP 562), so `import rain_llm` and the `rain` command start
without torch: the CLI sets OpenMP's wait policy before torch loads its thread pool.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Rain": "rain_llm.api", "ContinuousBatch": "rain_llm.api",
    "RainConfig": "rain_llm.config", "load_config": "rain_llm.config", "PRESETS": "rain_llm.config",
    "RainError": "rain_llm.errors",
    "AnswerStats": "rain_llm.runtime.answers", "Generation": "rain_llm.runtime.answers",
    "RainSearch": "rain_llm.search", "SearchEnv": "rain_llm.search",
}
__all__ = ["Rain", "ContinuousBatch", "Generation", "AnswerStats", "RainConfig", "load_config", "PRESETS",
           "RainError", "RainSearch", "SearchEnv"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from rain_llm.api import ContinuousBatch, Rain
    from rain_llm.config import PRESETS, RainConfig, load_config
    from rain_llm.errors import RainError
    from rain_llm.runtime.answers import AnswerStats, Generation
    from rain_llm.search import RainSearch, SearchEnv


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rain_llm' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
