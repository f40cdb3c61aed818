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


def test_runtime_sources_do_not_mention_the_compiler_package():
    from pathlib import Path
    root = Path(edgellm.__file__).parent / "runtime"
    for f in root.rglob("*.py"):
        text = f.read_text()
        assert "edgellm.compiler" not in text and "from ..compiler" not in text, f
