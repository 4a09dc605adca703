"""The report's accelerations section: seed 003's eight papers, each in the form pqk gives it for
a feed-forward transformer, with its benefit and effort MEASURED and the ranking recomputed,
beside the seed's guessed scores.

Sources, all measured by pqk's own code:
- quality: the records of configs/plans/accel.yaml (the run being reported): 8-bit attention
  against the INT8 model (experiment Q), rotations against plain PTQ at the same bits, TEAL
  against the teacher;
- speed at full size (DUSt3R 512 DPT, 512x384, one interleaved run each) from the benchmark
  results folder: pair_latency.json (8-bit attention on OpenVINO vs the same INT8 model without
  it), teal_speed.json (the Linears of one pair), matmul_nbits_speed.json (4-bit weights),
  scene_scale.json (the encoder-token cache and its codecs, the cascade);
- effort: the lines of each method's code and its number of tests, counted from the source.

Scores (1-10, the seed's scale), one documented rule rather than judgement:
  benefit = clip(20 x (1 - 1/speed-up) + 5 x (1 - 1/memory ratio), 0, 10), halved when the
  quality loss exceeds the protocol's 1 %; difficulty = clip(1 + lines / 100, 1, 10);
  ROI = benefit x (11 - difficulty) / 10.
A 1.5x speed-up alone scores 6.7, 2x scores 10; a method that is slower here scores 0.
`pqk report RUN_DIR` adds the section when the run has attn8, rotate or teal records.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pqk.report.tables import Table

SECTION_TITLE = "Accelerations (seed 003): measured ROI"
METHODS = ("attn8", "rotate", "teal")
# paper -> (benefit, difficulty, ROI) as guessed in seed 003 (shared/seeds/003).
SEED_003 = {
    "KV-Compress": (9, 6, 8.5), "TEAL": (8, 5, 7.8), "FlatQuant": (9, 8, 7.2), "INT-FlashAttention": (8, 8, 6.8),
    "SageAttention": (7, 7, 6.0), "KV Cache 1-bit": (8, 9, 5.5), "EAGLE-3": (5, 6, 4.2), "QSpec": (4, 5, 3.8),
}
MAX_DROP = 0.01


@dataclass
class Row:
    paper: str
    pqk_form: str
    speedup: float | None = None  # per pair (or the stated scope), vs `reference`
    scope: str = ""
    memory: float | None = None  # how many times smaller what it compresses gets
    quality: float | None = None  # relative δ1 change vs `reference` (negative: worse)
    reference: str = ""
    lines: int = 0
    tests: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def benefit(self) -> float:
        s = 20 * (1 - 1 / self.speedup) if self.speedup and self.speedup > 0 else 0.0
        m = 5 * (1 - 1 / self.memory) if self.memory and self.memory > 0 else 0.0
        score = min(10.0, max(0.0, s) + max(0.0, m))
        return score / 2 if self.quality is not None and self.quality < -MAX_DROP else score

    @property
    def difficulty(self) -> float:
        return min(10.0, 1 + self.lines / 100)

    @property
    def roi(self) -> float:
        return self.benefit * (11 - self.difficulty) / 10


# --- effort: lines and tests, counted -----------------------------------------------------------------


def _lines(objects: list[Any]) -> int:
    """Non-blank lines of the source of modules, classes or functions."""
    total = 0
    for obj in objects:
        try:
            src = inspect.getsource(obj)
        except (OSError, TypeError):
            continue
        total += sum(1 for line in src.splitlines() if line.strip())
    return total


def _tests(tests_dir: Path, files: tuple[str, ...], pattern: str = "") -> int:
    """`def test_` functions in the named test files (whose name matches `pattern`, if given)."""
    count = 0
    for name in files:
        path = tests_dir / name
        if path.is_file():
            count += len([m for m in re.findall(r"^def (test_\w+)", path.read_text(), re.M) if re.search(pattern, m)])
    return count


def effort(tests_dir: Path) -> dict[str, tuple[int, int]]:
    """paper -> (lines of its pqk code, tests)."""
    import pqk.cascade as cascade
    import pqk.methods.cascade as cascade_step
    import pqk.methods.rotate.apply as rot_apply
    import pqk.methods.rotate.flatquant as rot_fq
    import pqk.methods.rotate.method as rot_method
    import pqk.methods.rotate.transforms as rot_transforms
    import pqk.methods.teal as teal
    import pqk.token_codecs as codecs
    from pqk.inference import EncoderCache
    from pqk.methods.quantize import keep
    from pqk.methods.quantize.method import Attn8, Attn8Spec
    from pqk.models.dust3r.model import attention_core
    from pqk.recon import scene_run

    attn8 = [Attn8, Attn8Spec, keep._score_matmuls, keep._attention_split, attention_core]
    cache = [EncoderCache, scene_run]
    rotate_common = [rot_method, rot_apply, rot_transforms]
    return {
        "SageAttention": (_lines(attn8), _tests(tests_dir, ("test_openvino.py",), "attention|attn8")),
        "INT-FlashAttention": (_lines(attn8), _tests(tests_dir, ("test_openvino.py",), "attention|attn8")),
        "FlatQuant": (_lines([*rotate_common, rot_fq]), _tests(tests_dir, ("test_rotate.py",))),
        "TEAL": (_lines([teal]), _tests(tests_dir, ("test_teal.py",))),
        "KV-Compress": (_lines([*cache, codecs]), _tests(tests_dir, ("test_encoder_cache.py",))),
        "KV Cache 1-bit": (_lines([*cache, codecs]), _tests(tests_dir, ("test_encoder_cache.py",))),
        "EAGLE-3": (_lines([cascade, cascade_step]), _tests(tests_dir, ("test_cascade.py",))),
        "QSpec": (_lines([cascade, cascade_step]), _tests(tests_dir, ("test_cascade.py",))),
    }


# --- benefit: from the records and the benchmark results ---------------------------------------------


def _read(folder: Path, name: str) -> dict | None:
    path = Path(folder) / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _delta(records: dict[str, Any], exp: str, ref: str) -> float | None:
    """Relative δ1 change of plan experiment `exp` against `ref` (None: either missing)."""
    a, b = records.get(exp), records.get(ref)
    if a is None or b is None:
        return None
    x, y = _num(getattr(a, "delta1", None)), _num(getattr(b, "delta1", None))
    return None if x is None or y is None or y == 0 else x / y - 1


def _num(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _pair_speedups(latency: dict | None) -> dict[str, float]:
    """8-bit attention on OpenVINO vs the same INT8 model without it (full-size model, one run)."""
    if not latency:
        return {}
    out = {}
    for name, model in (latency.get("models") or {}).items():
        variants = model.get("variants") or {}
        base = (variants.get("openvino int8 (QDQ)") or {}).get("p50_ms")
        for label, v in variants.items():
            if label.startswith("openvino int8 + ") and base:
                out.setdefault(label.split("+ ", 1)[1].split(" ")[0], base / v["p50_ms"])
        break  # the first model: the full-size teacher
    return out


def build_rows(records: dict[str, Any], results: Path, tests_dir: Path) -> list[Row]:
    """One row per seed-003 paper (see the module docstring); `records`: plan experiment id -> Record."""
    latency = _read(results, "pair_latency.json")
    teal = _read(results, "teal_speed.json")
    nbits = _read(results, "matmul_nbits_speed.json")
    scene = _read(results, "scene_scale.json")
    attn = _pair_speedups(latency)
    rows = [
        Row("SageAttention", "attn8 sage: q·kᵀ INT8 in the QDQ file, K smoothed; OpenVINO", attn.get("int8_qk"),
            "pair, full size, vs INT8 Linears on OpenVINO", None, _delta(records, "A8_sage", "Q"), "Q (INT8)"),
        Row("INT-FlashAttention", "attn8 int_flash: q·kᵀ and P·V INT8", attn.get("int8_qkv"),
            "pair, full size, vs INT8 Linears on OpenVINO", None, _delta(records, "A8_intflash", "Q"), "Q (INT8)"),
        Row("FlatQuant", "rotate flatquant W4A8 (fake quantization; 4-bit weights)", None, "", None,
            _delta(records, "R_fq_W4A8", "R_none_W4A8"), "plain PTQ W4A8",
            notes=["no packed 4-bit model is written (fake quantization): its size is not measured"]),
        Row("TEAL", "teal 40 % (structured: channels per view, smaller GEMM)", None, "", None,
            _delta(records, "T_s40", "baseline"), "teacher"),
    ]
    if nbits:
        r = nbits.get("results", {})
        four, eight = (r.get("nbits4_acc4") or {}).get("ms_2t"), (r.get("int8_dynamic") or {}).get("ms_2t")
        if four and eight:
            rows[2].speedup, rows[2].scope = eight / four, "one full-size GEMM, 4-bit weights (ORT MatMulNBits) vs INT8"
    if teal:
        pp = teal.get("per_pair_ms") or {}
        if pp.get("dense fp32") and pp.get("(c) structured gather 40%"):
            rows[3].speedup = pp["dense fp32"] / pp["(c) structured gather 40%"]
            rows[3].scope = "the Linears of a pair in fp32"
            if pp.get("int8 dense") and pp.get("(d) int8 + mask 40%"):
                rows[3].notes.append(f"on INT8 Linears the mask costs: {pp['int8 dense'] / pp['(d) int8 + mask 40%']:.2f}x")
    rows += _scene_rows(scene)
    counted = effort(tests_dir)
    for row in rows:
        row.lines, row.tests = counted.get(row.paper, (0, 0))
    return rows


def _scene_rows(scene: dict | None) -> list[Row]:
    """The KV-cache and speculative papers in their feed-forward form (the encoder-token cache,
    its codecs, the cascade), from benchmarks/scene_scale.py's result."""
    rows = [Row("KV-Compress", "encoder-token cache, int8 codec (scene inference)"),
            Row("KV Cache 1-bit", "encoder-token cache, 1-bit codec"),
            Row("EAGLE-3", "cascade: half-resolution draft, full model verifies"),
            Row("QSpec", "cascade with an INT8 draft (measured no cheaper than float here)")]
    if not scene:
        return rows
    from pqk.report.scene_scale import operating_point, share_check

    check = share_check(scene)
    codecs = {(c["cache"], c["views"]): c for c in scene.get("codecs") or []}
    full = (scene.get("cascade") or {}).get("full")
    for row, codec in ((rows[0], "int8"), (rows[1], "1bit")):
        c = codecs.get((codec, 32))
        if check and c and full:
            row.speedup = 1 / (1 - check["measured_cut"])
            row.scope = "scene inference, 32 views, vs no cache"
            row.memory = full["cache_MB"] / c["cache_MB"]
            row.quality = c["delta1"] / full["delta1"] - 1
            row.reference = "fp32 cache"
    point = operating_point(scene["cascade"]) if scene.get("cascade") else None
    if point:
        rows[2].speedup, rows[2].scope = point["inference_speedup"], "scene inference, 32 views, quality within 1 %"
        rows[2].quality, rows[2].reference = 0.0, "full model (chosen within 1 %)"
    rows[3].speedup, rows[3].scope = 1.0, "the INT8 draft is no faster than float on the embedded teacher"
    return rows


# --- the section ---------------------------------------------------------------------------------------


def roi_table(rows: list[Row]) -> Table:
    ranked = sorted(rows, key=lambda r: -r.roi)
    seed_rank = {p: k + 1 for k, p in enumerate(sorted(SEED_003, key=lambda p: -SEED_003[p][2]))}
    out = []
    for k, r in enumerate(ranked, start=1):
        b, d, roi = SEED_003[r.paper]
        out.append([r.paper, r.pqk_form, f"{b} / {d} / {roi}", str(seed_rank[r.paper]),
                    "—" if r.speedup is None else f"{r.speedup:.2f}x", r.scope or "—",
                    "—" if r.memory is None else f"{r.memory:.1f}x",
                    "—" if r.quality is None else f"{r.quality:+.1%} vs {r.reference}",
                    str(r.lines), str(r.tests), f"{r.benefit:.1f} / {r.difficulty:.1f} / {r.roi:.1f}", str(k)])
    return Table(["paper", "in pqk", "seed 003: benefit / difficulty / ROI (guessed)", "seed rank", "speed-up",
                  "scope", "memory", "quality (δ1)", "lines", "tests", "measured: benefit / difficulty / ROI",
                  "measured rank"], out, numeric=[False, False, False, True, True, False, True, False, True, True,
                                                  False, True],
                 caption="Seed 003's papers, guessed vs measured (rule in pqk.report.accel_roi; 8-bit attention "
                         "and rotation quality from this run's records, speed from benchmarks/results)")


def has_accel_records(data) -> bool:
    """Whether a run has steps of the accelerations (attn8, rotate, teal)."""
    steps = [s for e in data.plan_raw.get("experiments") or [] if isinstance(e, dict) for s in e.get("steps") or []]
    return any(isinstance(s, dict) and s.get("method") in METHODS for s in steps)


def _side_by_side_gain(data, exp: str, ref: str = "Q") -> float | None:
    """How much faster experiment `exp`'s deployed runtime is than `ref`'s, each taken as its
    speed-up over eager FP32 in its own step's side-by-side timing (the two steps ran apart)."""
    def speedup(plan_id: str) -> float | None:
        exp_id = next((e for e, p in data.experiments.items() if p == plan_id), None)
        details = ((data.evals.get(exp_id) or {}).get("details") or {}) if exp_id else {}
        variants = ((details.get("step") or {}).get("latency_side_by_side") or {}).get("variants") or {}
        return (variants.get("openvino int8 (QDQ)") or {}).get("speedup")

    a, b = speedup(exp), speedup(ref)
    return a / b if a and b else None


def accel_section(data, results: Path, tests_dir: Path) -> tuple[str, str, str, list[str]]:
    """(Markdown, LaTeX, HTML, notes) of the section."""
    records = {data.experiments[r.exp_id]: r for r in data.records if r.exp_id in data.experiments}
    rows = build_rows(records, Path(results), Path(tests_dir))
    table = roi_table(rows)
    notes = [f"{r.paper}: {n}" for r in rows for n in r.notes]
    gains = {exp: _side_by_side_gain(data, exp) for exp in ("A8_sage", "A8_sage_nosmooth", "A8_intflash")}
    if any(gains.values()):
        notes.append("8-bit attention on this run's model (OpenVINO, speed-up over eager FP32 in its step's side-by-side "
                     "timing, relative to Q's): " + ", ".join(f"{k} {v:.2f}x" for k, v in gains.items() if v))
    missing = [n for n in ("pair_latency.json", "teal_speed.json", "matmul_nbits_speed.json", "scene_scale.json")
               if not (Path(results) / n).is_file()]
    if missing:
        notes.append(f"accelerations: no {', '.join(missing)} in {results}: those speed-ups are left empty")
    if not Path(tests_dir).is_dir():
        notes.append(f"accelerations: no test folder {tests_dir} here (run from the repository root): tests counted as 0")
    md = "\n".join([f"**{table.caption}**\n", table.markdown(), *(f"- {n}" for n in notes)])
    return md, table.latex("tab:accel-roi"), table.html() + "".join(f"<p>{n}</p>" for n in notes), notes
