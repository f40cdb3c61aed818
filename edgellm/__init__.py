"""edgellm: on-device LLM inference runtime and compiler."""
from .errors import EdgeLLMError


def __getattr__(name: str):
    """LLM and GenerationResult are imported on first use, so `import edgellm` (the CLI, the compiler) stays cheap."""
    if name in ("LLM", "GenerationResult"):
        from .runtime import llm
        return getattr(llm, name)
    raise AttributeError(f"module 'edgellm' has no attribute {name!r}")


def compile(model, target: str = "x86-64", out=None, **kw):
    """Compile `model` into a bundle for `target` (needs the compiler extras: pip install 'edgellm[compiler]').

    Keywords as edgellm.compiler.pipeline.compile_model: backends, quant ("gguf-native", "w8a8", "w4a8", "w4a16",
    "w8a16"), group_size, asym, integer_only, kv_int8, act, calibration, calib_tokens, report, ...
    """
    from .compiler import compile as _compile
    return _compile(model, target, out, **kw)


__all__ = ["LLM", "GenerationResult", "EdgeLLMError", "compile"]
__version__ = "0.1.0"
