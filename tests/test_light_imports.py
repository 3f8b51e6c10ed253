"""The upstream client, the failover loop and the framing load without mitmproxy (it costs ~250 ms to import)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import kimi_rotator


@pytest.mark.parametrize("module", ["kimi_rotator.upstream", "kimi_rotator.failover", "kimi_rotator.http1"])
def test_imports_without_mitmproxy(module: str) -> None:
    code = f"import sys, {module}; print('mitmproxy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False", f"{module} imports mitmproxy"


@pytest.mark.parametrize("name", ["KIMI_PORT", "HOP_BY_HOP", "MAX_HEAD"])
def test_shared_constants_are_defined_once(name: str) -> None:
    package = Path(kimi_rotator.__file__).parent
    defined = [p.name for p in sorted(package.glob("*.py"))
               if re.search(rf"^{name}\b.*=", p.read_text(encoding="utf-8"), re.MULTILINE)]
    assert len(defined) == 1, defined
