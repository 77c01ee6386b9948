"""Import rules of the protocol part: it works where torch is absent, and only the transport (and
its fix of paho's property parser) imports paho, so the transport can be swapped in one place."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import sfprompt.protocol

PROTOCOL = Path(sfprompt.protocol.__file__).parent


def test_protocol_imports_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
        "import pkgutil, importlib, sfprompt.protocol as p\n"
        "for m in pkgutil.iter_modules(p.__path__):\n"
        "    importlib.import_module(f'{p.__name__}.{m.name}')\n"
        "assert 'cryptography' not in sys.modules, 'cryptography must stay out of protocol/'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_only_the_transport_imports_paho() -> None:
    importers = {
        path.name
        for path in PROTOCOL.glob("*.py")
        if re.search(r"^\s*(import|from)\s+paho", path.read_text(), re.M)
    }
    assert importers == {"transport.py", "paho_fixes.py"}


def test_nothing_unpickles() -> None:
    for path in PROTOCOL.glob("*.py"):
        text = path.read_text()
        assert not re.search(r"import pickle|pickle\.load|allow_pickle=True", text), path.name
