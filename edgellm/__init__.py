"""edgellm: on-device LLM inference runtime and compiler."""
from .errors import EdgeLLMError
from .runtime.llm import LLM, GenerationResult

__all__ = ["LLM", "GenerationResult", "EdgeLLMError"]
__version__ = "0.1.0"
