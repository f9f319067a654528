"""The runtime imports and generates with torch, transformers and optimum unavailable."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
for name in ("torch", "transformers", "optimum", "onnx"):
    sys.modules[name] = None  # any import of them now raises ImportError
import edgekit.runtimes as rt
model = rt.load(sys.argv[1])
text = "".join(model.stream([{"role": "user", "content": "Hi"}], max_new_tokens=8, temperature=0.7, top_p=0.9, seed=1))
assert isinstance(text, str)
guided = model.stream("Hi", max_new_tokens=8, regex="[a-z]{3}", logprobs=2)  # llguidance needs no torch either
out = "".join(guided)
assert len(out) == 3 and out.isalpha() and len(guided.logprobs) == len(guided.stats.token_ids) > 0, out
loaded = [m for m in ("torch", "transformers", "optimum") if sys.modules.get(m) is not None]
assert not loaded, loaded
print("OK", len(text))
"""


def test_runtime_works_without_torch(llama_bundle):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(llama_bundle)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("OK")


def test_runtime_sources_do_not_import_heavy_packages():
    import pathlib
    import re

    root = pathlib.Path(__import__("edgekit.runtimes", fromlist=["x"]).__file__).parent
    pattern = re.compile(r"^\s*(import|from)\s+(torch|transformers|optimum|edgekit\.export|edgekit\.cli)\b", re.M)
    offenders = [p.name for p in root.glob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
