"""Model families pqk measures, each one task adapter (`pqk.tasks.base.Task`).

    >>> from pqk.tasks import get_task
    >>> task = get_task("dust3r")
    >>> task.main_metric, task.quality_fields
    ('delta1', ('chamfer', 'absrel', 'rmse', 'delta1'))

A family registers its adapter here (or calls `register_task`); plans name it with
`task: <name>` and default to DUSt3R.
"""

from __future__ import annotations

from importlib import import_module

from pqk.errors import ConfigError
from pqk.tasks.base import Measurement, Task

DEFAULT_TASK = "dust3r"
# Built-in families, imported on first use (a family's modules are not loaded unless asked for).
_BUILTIN = {"dust3r": "pqk.tasks.dust3r", "clip": "pqk.tasks.clip"}
_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Make `task` available to plans and commands by its name."""
    _TASKS[task.name] = task
    return task


def task_names() -> list[str]:
    return sorted({*_BUILTIN, *_TASKS})


def get_task(name: str | None = None) -> Task:
    """The adapter of family `name` (default: DUSt3R); one-line error for an unknown one."""
    name = name or DEFAULT_TASK
    if name not in _TASKS:
        if name not in _BUILTIN:
            raise ConfigError(f"unknown task {name!r}; accepted: {', '.join(task_names())}")
        register_task(import_module(_BUILTIN[name]).TASK)
    return _TASKS[name]


def infer_family(path) -> str:
    """The family of a model file, read from what it says about itself without loading it:
    pqk's metadata (safetensors or ONNX), CLIP's key names, a TorchScript archive (OpenAI's
    CLIP releases); anything else is taken for DUSt3R (whose loader then names the problem)."""
    import zipfile
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        config = path / "config.json"
        try:
            text = config.read_text() if config.is_file() else ""
            return "clip" if "CLIPModel" in text or '"vision_config"' in text else DEFAULT_TASK
        except (OSError, UnicodeDecodeError):
            return DEFAULT_TASK
    if not path.is_file():
        return DEFAULT_TASK
    if path.suffix == ".onnx":
        from pqk.backends.clip_onnx import read_meta

        return "clip" if read_meta(path).get("pqk_family") == "clip" else DEFAULT_TASK
    if path.suffix == ".safetensors":
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta, keys = f.metadata() or {}, list(f.keys())
        except Exception:  # unreadable: the family's loader reports it
            return DEFAULT_TASK
        family = meta.get("pqk_family")
        if family:
            return family
        if "pqk_config" in meta:  # pqk files written before families were named
            return "clip" if '"vision_width"' in meta["pqk_config"] else DEFAULT_TASK
        clip_keys = ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight")
        return "clip" if any(k in keys or f"module.{k}" in keys for k in clip_keys) else DEFAULT_TASK
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if any("/code/" in n or n.startswith("code/") for n in z.namelist()):
                return "clip"  # a TorchScript archive: how OpenAI released CLIP
    return DEFAULT_TASK


__all__ = ["DEFAULT_TASK", "Measurement", "Task", "get_task", "infer_family", "register_task", "task_names"]
