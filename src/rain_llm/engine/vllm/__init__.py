"""engine/vllm: RAIN against vLLM servers over their OpenAI-compatible HTTP API (token ids in and out)."""

from rain_llm.engine.vllm.backend import DEFAULT_KEY_ENV, VLLMBackend, connect

__all__ = ["DEFAULT_KEY_ENV", "VLLMBackend", "connect"]
