"""pqk: distill (K), prune (P) and quantize (Q) feed-forward transformers under one protocol.

The Python API (`pqk.distill`, `pqk.prune`, `pqk.quantize`, `pqk.evaluate`, `pqk.run_plan`) and
the spec dataclasses are loaded on first use, so `import pqk` (and the command line's start)
does not import torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = {
    "distill": "pqk.api", "prune": "pqk.api", "quantize": "pqk.api", "evaluate": "pqk.api", "run_plan": "pqk.api",
    "QuantizedModel": "pqk.api",
    "DistillSpec": "pqk.methods.distill", "PruneSpec": "pqk.methods.prune", "QuantSpec": "pqk.methods.quantize",
    "register_method": "pqk.methods.base", "register_task": "pqk.tasks",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'pqk' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(_API[name])
    value = getattr(module, "register" if name == "register_method" else name)
    globals()[name] = value
    return value
