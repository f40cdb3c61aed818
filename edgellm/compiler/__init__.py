"""Offline compiler (runs on the developer's workstation): import, ONNX + passes, TVM kernels, bundles."""


def compile(model, target: str = "x86-64", out=None, **kw):
    """Compile `model` for `target` into a bundle directory; see edgellm.compiler.pipeline.compile_model."""
    from .pipeline import compile_model
    return compile_model(model, target, out, **kw)
