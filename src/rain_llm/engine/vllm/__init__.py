"""engine/vllm: RAIN against vLLM servers over their OpenAI-compatible HTTP API (token ids in and out)."""

from rain_llm.engine.vllm.backend import VLLMBackend
from rain_llm.engine.vllm.client import DEFAULT_KEY_ENV
from rain_llm.engine.vllm.connect import Remote, open_servers

__all__ = ["DEFAULT_KEY_ENV", "VLLMBackend", "Remote", "open_servers"]
