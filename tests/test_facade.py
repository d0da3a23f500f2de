"""The facade: the public API by name, lazily loaded, the same objects however the submodules were imported."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import json, sys
import compress.errors
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("compress", "criteria", "exporters"))
import compress.prune, compress.quantize  # submodules named like the functions, imported first
from compress import prune, Target, plan_bits, Budget, quantize, check, save, load, data, CompressError
from exporters import export_onnx
import criteria
print(json.dumps({"loaded": loaded, "callables": [callable(f) for f in (prune, plan_bits, quantize, check, save, load,
                                                                       export_onnx, criteria.get, criteria.names)],
                  "data": data.__name__, "error": CompressError.__module__}))
"""


def test_public_api_is_lazy_and_stable() -> None:
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout)
    assert out["loaded"] == ["compress", "compress.errors", "compress.version"]  # nothing else loads with errors
    assert all(out["callables"]), out["callables"]
    assert out["data"] == "compress.data" and out["error"] == "compress.errors"
