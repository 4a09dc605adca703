"""The 'mst' initialisation of global alignment: chain the pair pointmaps along a
maximum spanning tree into one frame, give every camera a pose and focal, and write that
start into the parameters. Where this departs from the official code is listed in
`pqk.recon.global_alignment`'s module docstring."""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.sparse.csgraph import minimum_spanning_tree

from pqk.errors import InputError
from pqk.recon.alignment_loss import BASE_SCALE, FOCAL_BREAK, _Params
from pqk.recon.camera_geometry import (
    MIN_FOCAL,
    _pixel_grid,
    _rotmat_to_quat,
    _signed_log1p,
    _to_matrix,
    estimate_focal,
)
from pqk.recon.pair_graph import _PairGraph
from pqk.tasks.dust3r.metrics import umeyama_sim3


def _sim3(src: torch.Tensor, dst: torch.Tensor, weights: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Weighted Umeyama fit of dst ≈ s·R·src + t over the finite pixels, as float32 tensors."""
    src_np, dst_np, w_np = (x.detach().cpu().double().numpy() for x in (src, dst, weights))
    src_np, dst_np, w_np = src_np.reshape(-1, 3), dst_np.reshape(-1, 3), w_np.reshape(-1)
    keep = np.isfinite(src_np).all(1) & np.isfinite(dst_np).all(1) & np.isfinite(w_np)
    s, rot, trans = umeyama_sim3(src_np[keep], dst_np[keep], w_np[keep])
    return s, *(torch.as_tensor(x, dtype=torch.float32, device=src.device) for x in (rot, trans))


def _apply(s: float, rot: torch.Tensor, trans: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    return s * pts @ rot.T + trans


def _edge_scores(g: _PairGraph) -> list[float]:
    return [float(ci.mean() * cj.mean()) for ci, cj in zip(g.conf_i, g.conf_j)]


def _spanning_tree(g: _PairGraph, scores: list[float]) -> list[tuple[float, int, int]]:
    """Maximum spanning tree over image pairs as (score, i, j); each tree edge keeps the
    better of its two directions (scipy's MST treats the graph as undirected)."""
    best: dict[tuple[int, int], tuple[float, int, int]] = {}
    for (i, j), score in zip(g.edges, scores):
        key = (min(i, j), max(i, j))
        if key not in best or score > best[key][0]:
            best[key] = (score, i, j)
    weights = np.zeros((g.n_images, g.n_images))
    for (a, b), (score, _, _) in best.items():
        weights[a, b] = -score  # scores are > 1 (conf > 1), so no weight is a missing 0
    tree = minimum_spanning_tree(weights).tocoo()
    if len(tree.row) != g.n_images - 1:
        raise InputError("the pair graph is not connected: global alignment needs one connected scene")
    return [best[(min(a, b), max(a, b))] for a, b in zip(tree.row.tolist(), tree.col.tolist())]


def _grow_tree(g: _PairGraph, tree: list[tuple[float, int, int]]) -> tuple[list[torch.Tensor], dict[int, torch.Tensor]]:
    """Chain the tree edges into one frame, best edge first (facts §5.4 steps 2–3).

    Returns every image's points in the common frame and the poses (4×4) found on the way:
    the camera of an edge's view 1 gets the rigid part of the fitted similarity.
    """
    edge_index = {e: k for k, e in enumerate(g.edges)}
    todo = sorted(tree)
    _, i, j = todo.pop()
    e = edge_index[(i, j)]
    pts: list = [None] * g.n_images
    pts[i], pts[j] = g.pred_i[e].clone(), g.pred_j[e].clone()
    poses = {i: torch.eye(4, device=pts[i].device)}
    while todo:
        score, i, j = todo.pop()
        e = edge_index[(i, j)]
        if pts[i] is not None:
            s, rot, trans = _sim3(g.pred_i[e], pts[i], g.conf_i[e])
            pts[j] = _apply(s, rot, trans, g.pred_j[e])
        elif pts[j] is not None:
            s, rot, trans = _sim3(g.pred_j[e], pts[j], g.conf_j[e])
            pts[i] = _apply(s, rot, trans, g.pred_i[e])
        else:
            todo.insert(0, (score, i, j))  # not yet attached to the built part: retry later
            continue
        poses.setdefault(i, _to_matrix(rot[None], trans[None])[0])
    return pts, poses


def _best_own_edges(g: _PairGraph, scores: list[float]) -> dict[int, int]:
    """Per image, the most confident edge where it is view 1 (its pointmap in its own frame)."""
    best: dict[int, int] = {}
    for e, (i, _) in enumerate(g.edges):
        if i not in best or scores[e] > scores[best[i]]:
            best[i] = e
    return best


def _confident(conf: torch.Tensor, im_conf: torch.Tensor, thr: float) -> torch.Tensor:
    """`conf` restricted to pixels with im_conf > thr (the official PnP mask), unless
    that leaves too few pixels to fit anything."""
    mask = im_conf > thr
    return conf * mask if int(mask.sum()) >= 6 else conf


def _dlt_projection(pts: torch.Tensor, pix: torch.Tensor, wts: torch.Tensor) -> torch.Tensor:
    """3×4 projection P (up to scale and sign) with pix ~ P·[pts, 1]: the 12-vector that
    minimises the weighted algebraic error, i.e. the smallest eigenvector of AᵀA."""
    # Hartley normalisation of the 3D side keeps the 12×12 system well conditioned
    centre = pts.mean(0)
    spread = (pts - centre).norm(dim=-1).mean() / math.sqrt(3)
    homog = torch.cat([(pts - centre) / spread, torch.ones(len(pts), 1, dtype=pts.dtype)], dim=-1)
    zeros = torch.zeros_like(homog)
    rows_u = torch.cat([homog, zeros, -pix[:, :1] * homog], dim=-1)
    rows_v = torch.cat([zeros, homog, -pix[:, 1:] * homog], dim=-1)
    a = torch.cat([rows_u, rows_v]) * wts.repeat(2).sqrt()[:, None]
    proj = torch.linalg.eigh(a.T @ a).eigenvectors[:, 0].reshape(3, 4)
    denorm = torch.eye(4, dtype=pts.dtype)
    denorm[:3, :3] /= spread
    denorm[:3, 3] = -centre / spread
    return proj @ denorm


def _decompose_projection(proj: torch.Tensor) -> tuple[float, torch.Tensor] | None:
    """(f, cam2world) from P ∝ diag(f, f, 1)·[R | t]; None if P is degenerate."""
    m = proj[:, :3]
    if torch.linalg.det(m) < 0:  # K·R has det f² > 0: fix the sign an eigenvector loses
        proj, m = -proj, -m
    proj, m = proj / m[2].norm(), m / m[2].norm()
    focal = float((m[0].norm() + m[1].norm()) / 2)
    if not math.isfinite(focal) or focal <= 0:
        return None
    u, _, vt = torch.linalg.svd(torch.stack([m[0] / focal, m[1] / focal, m[2]]))
    rot = u @ vt  # nearest rotation, world → camera
    trans = torch.stack([proj[0, 3] / focal, proj[1, 3] / focal, proj[2, 3]])
    cam2world = torch.eye(4, dtype=proj.dtype)
    cam2world[:3, :3], cam2world[:3, 3] = rot.T, -rot.T @ trans
    return focal, cam2world


def _linear_pnp(world: torch.Tensor, weights: torch.Tensor) -> tuple[float, torch.Tensor] | None:
    """Focal and cam2world of a camera from its pixels' world points, principal point at
    the image centre, by a weighted DLT; None if degenerate. Stands in for the official
    RANSAC PnP: there is no outlier rejection, the weights must do it."""
    h, w = world.shape[:2]
    pts = world.reshape(-1, 3).double().cpu()
    wts = weights.reshape(-1).double().cpu()
    keep = torch.isfinite(pts).all(-1) & (wts > 0)
    if int(keep.sum()) < 6:
        return None
    size = max(h, w)  # pixels divided by the image size, like the 3D side, for conditioning
    pix = (_pixel_grid(h, w, torch.device("cpu")).double() - torch.tensor([w / 2, h / 2])) / size
    unscale = torch.diag(torch.tensor([size, size, 1.0], dtype=pts.dtype))
    found = _decompose_projection(unscale @ _dlt_projection(pts[keep], pix[keep], wts[keep]))
    if found is None:
        return None
    return max(found[0], MIN_FOCAL), found[1].float().to(world.device)


def _complete_cameras(
    g: _PairGraph,
    pts: list[torch.Tensor],
    poses: dict[int, torch.Tensor],
    own: dict[int, int],
    im_conf: list[torch.Tensor],
    thr: float,
) -> tuple[torch.Tensor, list[float]]:
    """Every camera's initial pose (N, 4, 4) and focal.

    A camera the tree left without a pose gets, if it is view 1 of some edge, the rigid part
    of the similarity mapping its best own-frame pointmap onto its placed points; otherwise
    a linear PnP on its placed points (the official code uses RANSAC PnP for both); identity
    if that fails. Focals come from each image's best own-frame pointmap (Weiszfeld).
    """
    cam2world, focals = [], []
    for k in range(g.n_images):
        focal = estimate_focal(g.pred_i[own[k]]) if k in own else float(max(g.shapes[k]))
        pose = poses.get(k)
        if pose is None and k in own:
            e = own[k]
            _, rot, trans = _sim3(g.pred_i[e], pts[k], _confident(g.conf_i[e], im_conf[k], thr))
            pose = _to_matrix(rot[None], trans[None])[0]
        elif pose is None:
            found = _linear_pnp(pts[k], _confident(im_conf[k], im_conf[k], thr))
            if found is not None:
                focal, pose = found
        cam2world.append(pose if pose is not None else torch.eye(4, device=pts[k].device))
        focals.append(focal)
    return torch.stack(cam2world), focals


# ---------------------------------------------------------------- init into parameters


def _quat_like(rot: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(_rotmat_to_quat(rot.cpu().numpy()), dtype=like.dtype, device=like.device)


def _set_edge_poses(p: _Params, g: _PairGraph, pts: list[torch.Tensor]) -> float:
    """Fit each edge's similarity onto the initial scene; returns the factor that brings
    the edge scales to a geometric mean of BASE_SCALE (to be applied to the scene too)."""
    log_scales = []
    for e, (i, _) in enumerate(g.edges):
        s, rot, trans = _sim3(g.pred_i[e], pts[i], g.conf_i[e])
        p.pw_pose[e, :4] = _quat_like(rot, p.pw_pose)
        p.pw_pose[e, 4:7] = _signed_log1p(trans / s)
        p.pw_pose[e, 7] = math.log(s)
        log_scales.append(math.log(s))
    return BASE_SCALE / math.exp(float(np.mean(log_scales)))


def _set_image_params(p: _Params, pts: list[torch.Tensor], cam2world: torch.Tensor, focals: list[float]) -> None:
    for k, (world, pose) in enumerate(zip(pts, cam2world)):
        rot, trans = pose[:3, :3], pose[:3, 3]
        depth = ((world.reshape(-1, 3) - trans) @ rot)[:, 2]  # z in camera k (R^T·(x − t))
        # a point behind the camera has no log-depth; DUSt3R's nan_to_num puts it at depth 1
        ok = torch.isfinite(depth) & (depth > 0)
        p.log_depth[k, : len(depth)] = torch.where(ok, depth.clamp_min(1e-30).log(), torch.zeros_like(depth))
        p.im_pose[k, :4] = _quat_like(rot, p.im_pose)
        p.im_pose[k, 4:7] = _signed_log1p(trans)
        p.im_focal[k] = FOCAL_BREAK * math.log(focals[k])


@torch.no_grad()
def _init_mst(p: _Params, g: _PairGraph, im_conf: list[torch.Tensor], min_conf_thr: float) -> None:
    scores = _edge_scores(g)
    pts, poses = _grow_tree(g, _spanning_tree(g, scores))
    own = _best_own_edges(g, scores)
    cam2world, focals = _complete_cameras(g, pts, poses, own, im_conf, min_conf_thr)
    factor = _set_edge_poses(p, g, pts)
    cam2world[:, :3, 3] *= factor
    _set_image_params(p, [x * factor for x in pts], cam2world, focals)
