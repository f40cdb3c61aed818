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
