"""The machine a timing ran on, and whether it was shared while it ran.

Speed ratios differ between CPUs of one kind (INT8 GEMMs on an Intel Xeon with AMX vs an AMD
EPYC Zen 4 with AVX-512 VNNI and no AMX), so every record and benchmark names the CPU and its
ISA. And a ratio timed while other jobs share the cores measures the load, not the model:
PyTorch's threads collapse under oversubscription far more than ONNX Runtime's. `Contention`
measures, over the timing window itself, how much CPU time *other* processes took (the
machine's busy time from /proc/stat minus this process's own CPU time); above a share of the
cores the timing is marked contended and a latency gate on it is inconclusive.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

# Share of all cores' time other processes may take during a timing before it is not trusted:
# a quiet machine measures 0.00-0.05 here (daemons); one extra busy thread on 2 cores is 0.5.
CONTENDED_SHARE = 0.25
_ISA_FLAGS = {"amx": "amx_int8", "avx512_vnni": "avx512_vnni", "avx512_bf16": "avx512_bf16", "avx512f": "avx512f",
              "avx2": "avx2", "avx_vnni": "avx_vnni"}


def _cpuinfo() -> tuple[str, set[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), set()
    name, flags = "", set()
    for line in text.splitlines():
        if line.startswith("model name") and not name:
            name = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
    return name or platform.machine(), flags


def machine_info() -> dict:
    """CPU model, its INT8/bf16-relevant ISA extensions, cores and PyTorch's thread count."""
    name, flags = _cpuinfo()
    info = {"cpu": name, "isa": {key: flag in flags for key, flag in _ISA_FLAGS.items()}, "cores": os.cpu_count()}
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def isa_label(info: dict | None = None) -> str:
    """'Intel Xeon ... (AMX, AVX-512 VNNI, BF16)' for headers."""
    info = info or machine_info()
    isa = info.get("isa") or {}
    parts = [label for key, label in (("amx", "AMX"), ("avx512_vnni", "AVX-512 VNNI"), ("avx512_bf16", "BF16"))
             if isa.get(key)]
    return f"{info['cpu']} ({', '.join(parts) or 'no AMX / AVX-512 VNNI / BF16'})"


def _busy_seconds() -> float | None:
    """CPU time all processes have spent busy since boot (every core), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    busy = sum(values[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


@dataclass
class Contention:
    """Use as a context manager around a timing; afterwards `others_share` is the share of all
    cores' time other processes took during it (None where /proc/stat cannot be read)."""

    others_share: float | None = None
    wall_s: float = 0.0

    def __enter__(self) -> Contention:
        self._busy, self._own, self._wall = _busy_seconds(), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall_s = time.perf_counter() - self._wall
        busy = _busy_seconds()
        if busy is None or self._busy is None or self.wall_s <= 0:
            return
        own = time.process_time() - self._own
        others = max(0.0, (busy - self._busy) - own)
        self.others_share = others / ((os.cpu_count() or 1) * self.wall_s)

    @property
    def contended(self) -> bool:
        return self.others_share is not None and self.others_share > CONTENDED_SHARE

    def to_json(self) -> dict:
        return {"others_share": None if self.others_share is None else round(self.others_share, 3),
                "threshold": CONTENDED_SHARE, "contended": self.contended, "wall_s": round(self.wall_s, 2)}
