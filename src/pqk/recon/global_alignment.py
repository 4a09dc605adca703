"""Global alignment of pairwise DUSt3R pointmaps into one scene: DUSt3R's
`PointCloudOptimizer` with `init='mst'` (dust3r-facts.md §5), written in plain torch.

Each pair result is a directed edge e = (i, j) holding image i's and image j's pointmaps,
both in camera i's frame and at the pair's own arbitrary scale. The scene is one depth map,
pose and focal per image plus one scaled rigid transform per edge; the loss asks each
edge's transformed pointmaps to land on the back-projected depth maps.
Camera convention: OpenCV (x right, y down, z forward), poses are camera-to-world 4×4.

Departures from the official code (all in the initialisation; the optimisation is the same):
- each image's initial focal comes from its own most confident edge (the one where it is
  view 1), not from the previously processed spanning-tree edge (facts §5.4 quirk);
- a camera that the spanning tree leaves without a pose gets the rotation/translation that
  maps its best edge's own-frame pointmap onto its placed points (pixels with
  im_conf > min_conf_thr), instead of RANSAC PnP; a camera that is view 1 of no edge
  (non-symmetrised graphs) gets a weighted linear PnP (DLT) without RANSAC, which also
  sets its focal; identity if that is degenerate;
- focal estimates are clamped to at least 1 pixel so that their log stays finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# The pieces live in their own modules; the names stay importable from here.
from pqk.recon.alignment_loss import (  # noqa: F401 (re-exported)
    BASE_SCALE,
    FOCAL_BREAK,
    _alignment_loss,
    _camera_points,
    _edge_scales,
    _edge_sim3,
    _focals,
    _im_rigid,
    _pad,
    _Params,
    _pixel_weights,
    _random_params,
    _stack,
    _Stacked,
    _world_points,
)
from pqk.recon.camera_geometry import (  # noqa: F401 (re-exported)
    MIN_FOCAL,
    WEISZFELD_ITERS,
    _pixel_grid,
    _quat_to_rotmat,
    _rotmat_to_quat,
    _signed_expm1,
    _signed_log1p,
    _to_matrix,
    _transform,
    estimate_focal,
)
from pqk.recon.mst_init import (  # noqa: F401 (re-exported)
    _apply,
    _best_own_edges,
    _complete_cameras,
    _confident,
    _decompose_projection,
    _dlt_projection,
    _edge_scores,
    _grow_tree,
    _init_mst,
    _linear_pnp,
    _quat_like,
    _set_edge_poses,
    _set_image_params,
    _sim3,
    _spanning_tree,
)
from pqk.recon.pair_graph import _PairGraph, _read_pairs, _record_shape  # noqa: F401 (re-exported)
from pqk.recon.pose_metrics import _angle, relative_pose_errors  # noqa: F401 (re-exported)

LR_MIN = 1e-6
ADAM_BETAS = (0.9, 0.9)
SCHEDULES = ("cosine", "linear")


@dataclass
class AlignmentResult:
    cam2world: torch.Tensor  # (N, 4, 4)
    focals: torch.Tensor  # (N,)
    principal_points: torch.Tensor  # (N, 2)
    depthmaps: list[torch.Tensor]  # per image (H_i, W_i)
    pts3d: list[torch.Tensor]  # per image (H_i, W_i, 3), world frame
    confidence: list[torch.Tensor]  # im_conf per image (max over the edges it appears in)
    final_loss: float
    n_iterations: int
    masks: list[torch.Tensor] = field(default_factory=list)  # confidence > min_conf_thr


# ---------------------------------------------------------------- optimisation


def _lr_at(t: float, lr: float, schedule: str) -> float:
    if schedule == "cosine":
        return LR_MIN + (lr - LR_MIN) * (1 + math.cos(math.pi * t)) / 2
    return lr + (LR_MIN - lr) * t


def _optimise(
    p: _Params, st: _Stacked, niter: int, lr: float, schedule: str, progress: Callable[[int], None] | None
) -> None:
    tensors = [t.requires_grad_(True) for t in p.tensors()]
    opt = torch.optim.Adam(tensors, lr=lr, betas=ADAM_BETAS)
    for it in range(niter):
        for group in opt.param_groups:
            group["lr"] = _lr_at(it / niter, lr, schedule)
        opt.zero_grad()
        _alignment_loss(p, st).backward()
        opt.step()
        if progress is not None:
            progress(it + 1)
    for t in tensors:
        t.requires_grad_(False)


def _unpad(flat: torch.Tensor, shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    return [f[: h * w].reshape(h, w, *f.shape[1:]).cpu() for f, (h, w) in zip(flat, shapes)]


@torch.no_grad()
def _result(p: _Params, st: _Stacked, g: _PairGraph, im_conf: list, niter: int, thr: float) -> AlignmentResult:
    rot, trans = _im_rigid(p)
    return AlignmentResult(
        cam2world=_to_matrix(rot, trans).cpu(),
        focals=_focals(p).cpu(),
        principal_points=st.pp.cpu(),
        depthmaps=_unpad(p.log_depth.exp(), g.shapes),
        pts3d=_unpad(_world_points(p, st), g.shapes),
        confidence=[c.cpu() for c in im_conf],
        final_loss=float(_alignment_loss(p, st)),
        n_iterations=niter,
        masks=[(c > thr).cpu() for c in im_conf],
    )


def global_alignment(
    pair_results: list[dict],
    n_images: int | None = None,
    niter: int = 300,
    lr: float = 0.01,
    schedule: str = "cosine",
    init: str = "mst",
    min_conf_thr: float = 3.0,
    device: str | torch.device = "cpu",
    seed: int = 42,
    progress: Callable[[int], None] | None = None,
) -> AlignmentResult:
    """Fuse pair results (`pqk.inference.inference` output) into one scene.

    `init`: "mst" (alias "msp"), or "none" to optimise from the seeded random start.
    Adam (betas 0.9, 0.9) for `niter` steps, learning rate from `lr` down to 1e-6 along
    `schedule` ("cosine" or "linear"). `progress(k)` is called after step k.
    `final_loss` is the loss at the returned parameters (after the last step); masks are
    im_conf > `min_conf_thr`, which also selects the pixels of the pose fallback.
    Two images run the same optimiser (the official demo would use PairViewer instead).
    Where the initialisation departs from the official code: see the module docstring.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES} (got {schedule!r})")
    if init not in ("mst", "msp", "none"):
        raise ValueError(f"init must be 'mst', 'msp' or 'none' (got {init!r})")
    device = torch.device(device)
    g = _read_pairs(pair_results, n_images, device)
    st = _stack(g, device)
    im_conf = g.im_conf()
    params = _random_params(g, st.grid.shape[1], seed, device)
    if init != "none":
        _init_mst(params, g, im_conf, min_conf_thr)
    _optimise(params, st, niter, lr, schedule, progress)
    return _result(params, st, g, im_conf, niter, min_conf_thr)
