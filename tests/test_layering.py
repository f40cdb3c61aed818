"""The device runtime must never pull in the workstation compiler or its heavy dependencies."""
import subprocess
import sys

import edgellm


def test_runtime_imports_nothing_from_the_compiler():
    code = ("import sys, edgellm, edgellm.runtime.llm, edgellm.cli, edgellm.hub\n"
            "import pkgutil, importlib, edgellm.runtime as r\n"
            "for m in pkgutil.iter_modules(r.__path__): importlib.import_module('edgellm.runtime.' + m.name)\n"
            "bad = [m for m in sys.modules if m.startswith(('edgellm.compiler', 'onnx', 'tvm'))]\n"
            "print(' '.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"runtime imported: {out}"


def test_runtime_sources_never_import_the_compiler_package():
    """Also catches imports inside functions, which the import test above cannot reach."""
    import re
    from pathlib import Path
    pattern = re.compile(r"^\s*(from|import)\s+(edgellm\.compiler|\.\.compiler)", re.M)
    root = Path(edgellm.__file__).parent
    for f in [*(root / "runtime").rglob("*.py"), *(root / "devices").rglob("*.py")]:
        assert not pattern.search(f.read_text()), f"{f} imports the compiler"


def test_loading_a_bundle_imports_only_what_running_it_needs(tmp_path):
    """`import edgellm` is cheap; LLM(bundle) + generating from token ids leaves out the tokenizer library
    (tokenizer.json is parsed on the first encode), psutil (threads given), jinja2 (no chat template yet)."""
    from edgellm.compiler.bundle_writer import write_bundle
    from edgellm.devices.targets import host_target
    from edgellm.runtime.loader import load_model
    from tinymodels import write_tiny_gguf
    bundle = write_bundle(load_model(write_tiny_gguf(tmp_path / "m.gguf")), tmp_path / "b", host_target().name)
    heavy = ("numpy", "tokenizers", "jinja2", "psutil", "matplotlib", "onnx", "onnxruntime", "tvm", "edgellm.compiler")
    code = ("import sys, edgellm\n"
            f"heavy = {heavy!r}\n"
            "loaded = lambda: ' '.join(m for m in heavy if m in sys.modules) or '-'\n"
            "print(loaded())\n"
            f"llm = edgellm.LLM({str(bundle)!r}, threads=1)\n"
            "r = llm.generate([1, 2, 3], max_tokens=3, temperature=0, ignore_eos=True)\n"
            "print(loaded(), len(r.tokens))\n"
            "llm.tokenize('the cat')\n"
            "print(loaded())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["-", "numpy 3", "numpy tokenizers"]
