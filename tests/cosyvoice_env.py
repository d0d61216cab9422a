"""Whether this interpreter can run the CosyVoice library's tests, and the skip that says how to get there.

The library needs torch, which the default install never pulls in: CI makes `.venv-cosyvoice` with
scripts/setup-cosyvoice-env.sh and runs the CosyVoice test files there (.ci/run). Elsewhere they skip with a reason
that starts "needs torch, torchaudio", which CI's strict-skip rule (tests/conftest.py) expects.
"""

from __future__ import annotations

import importlib.util

import pytest

MISSING = [m for m in ("torch", "torchaudio", "onnx", "transformers", "cosyvoice")
           if importlib.util.find_spec(m) is None]

# The reason names every file CI runs in that venv, so the command it gives is the one to copy.
REASON = (f"needs {', '.join(MISSING)} in this interpreter: run scripts/setup-cosyvoice-env.sh, then "
          ".venv-cosyvoice/bin/python -m pytest tests/test_cosyvoice_*.py")

needs_library = pytest.mark.skipif(bool(MISSING), reason=REASON)
