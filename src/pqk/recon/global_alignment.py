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

import numpy as np
import torch
from scipy.sparse.csgraph import minimum_spanning_tree

from pqk.errors import InputError
from pqk.tasks.dust3r.metrics import umeyama_sim3

FOCAL_BREAK = 20.0  # focals live as 20·log f: one Adam step moves a focal ~20× less than a log-depth
BASE_SCALE = 0.5  # geometric mean of the edge scales; fixes the scene's free global scale
LR_MIN = 1e-6
ADAM_BETAS = (0.9, 0.9)
SCHEDULES = ("cosine", "linear")
WEISZFELD_ITERS = 10
MIN_FOCAL = 1.0


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


# ---------------------------------------------------------------- inputs


@dataclass
class _PairGraph:
    """The pair results as edges; lists are per edge, maps keep their image shape."""

    shapes: list[tuple[int, int]]  # (H, W) per image
    edges: list[tuple[int, int]]
    pred_i: list[torch.Tensor]  # (H_i, W_i, 3): image i in camera i
    pred_j: list[torch.Tensor]  # (H_j, W_j, 3): image j in camera i
    conf_i: list[torch.Tensor]
    conf_j: list[torch.Tensor]

    @property
    def n_images(self) -> int:
        return len(self.shapes)

    def im_conf(self) -> list[torch.Tensor]:
        """Per image, the pixel-wise maximum confidence over every edge it appears in."""
        best: list[torch.Tensor | None] = [None] * self.n_images
        for (i, j), ci, cj in zip(self.edges, self.conf_i, self.conf_j):
            for k, c in ((i, ci), (j, cj)):
                best[k] = c.clone() if best[k] is None else torch.maximum(best[k], c)
        return best  # type: ignore[return-value]


def _record_shape(shapes: list, k: int, hw: tuple[int, int]) -> None:
    if shapes[k] is None:
        shapes[k] = hw
    elif shapes[k] != hw:
        raise InputError(f"image {k} appears with two shapes: {shapes[k]} and {hw}")


def _read_pairs(pair_results: list[dict], n_images: int | None, device: torch.device) -> _PairGraph:
    if not pair_results:
        raise InputError("global alignment needs at least one pair result")
    edges = [(int(r["view1"]["idx"]), int(r["view2"]["idx"])) for r in pair_results]
    n = n_images if n_images is not None else 1 + max(max(e) for e in edges)
    if any(not (0 <= k < n) for e in edges for k in e) or any(i == j for i, j in edges):
        raise InputError(f"pair indices must be distinct and in [0, {n}): got {edges}")

    def grab(r: dict, view: str, key: str) -> torch.Tensor:
        return torch.as_tensor(r[view][key]).to(device=device, dtype=torch.float32)

    pred_i = [grab(r, "pred1", "pts3d") for r in pair_results]
    pred_j = [grab(r, "pred2", "pts3d_in_other_view") for r in pair_results]
    conf_i = [grab(r, "pred1", "conf") for r in pair_results]
    conf_j = [grab(r, "pred2", "conf") for r in pair_results]
    shapes: list = [None] * n
    for (i, j), pi, pj, ci, cj in zip(edges, pred_i, pred_j, conf_i, conf_j):
        if pi.shape[:-1] != ci.shape or pj.shape[:-1] != cj.shape or pi.shape[-1] != 3:
            raise InputError(f"pair ({i}, {j}): pointmaps must be (H, W, 3) with (H, W) confidences")
        _record_shape(shapes, i, tuple(ci.shape))
        _record_shape(shapes, j, tuple(cj.shape))
    missing = [k for k, s in enumerate(shapes) if s is None]
    if missing:
        raise InputError(f"images {missing} appear in no pair")
    return _PairGraph(shapes, edges, pred_i, pred_j, conf_i, conf_j)


# ---------------------------------------------------------------- geometry helpers


def _signed_log1p(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(torch.abs(x))


def _signed_expm1(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.expm1(torch.abs(x))


def _quat_to_rotmat(q: torch.Tensor) -> torch.Tensor:
    """(..., 4) quaternions in (x, y, z, w) order, normalised here → (..., 3, 3)."""
    x, y, z, w = (q / q.norm(dim=-1, keepdim=True)).unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ]  # fmt: skip
    return torch.stack(rows, dim=-1).reshape(*q.shape[:-1], 3, 3)


def _rotmat_to_quat(rot: np.ndarray) -> np.ndarray:
    """Unit quaternion (x, y, z, w) of a rotation matrix; branches on the largest component
    so that the division never goes through a near-zero value (Shepperd's method)."""
    m = np.asarray(rot, dtype=np.float64)
    trace = np.trace(m)
    if trace > 0:
        s = 2 * math.sqrt(1 + trace)
        q = [(m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s, s / 4]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = 2 * math.sqrt(1 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [s / 4, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s, (m[2, 1] - m[1, 2]) / s]
    elif m[1, 1] > m[2, 2]:
        s = 2 * math.sqrt(1 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 1] + m[1, 0]) / s, s / 4, (m[1, 2] + m[2, 1]) / s, (m[0, 2] - m[2, 0]) / s]
    else:
        s = 2 * math.sqrt(1 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, s / 4, (m[1, 0] - m[0, 1]) / s]
    q = np.asarray(q)
    return q / np.linalg.norm(q)


def _transform(rot: torch.Tensor, trans: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Batched x → R·x + t: rot (B, 3, 3), trans (B, 3), pts (B, P, 3)."""
    return pts @ rot.transpose(1, 2) + trans[:, None]


def _to_matrix(rot: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
    out = torch.eye(4, dtype=rot.dtype, device=rot.device).repeat(len(rot), 1, 1)
    out[:, :3, :3] = rot
    out[:, :3, 3] = trans
    return out


def _pixel_grid(h: int, w: int, device: torch.device) -> torch.Tensor:
    """(H·W, 2) integer pixel coordinates (u, v), row-major like a flattened map."""
    v, u = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([u, v], dim=-1).reshape(-1, 2).float()


# ---------------------------------------------------------------- focal estimate


def estimate_focal(pts3d: torch.Tensor, pp: torch.Tensor | None = None) -> float:
    """Focal (pixels) of a pointmap in its own camera frame: the f for which f·(x/z, y/z)
    best matches each pixel's offset from the principal point (default: image centre),
    least squares then 10 Weiszfeld reweightings (DUSt3R's 'weiszfeld' mode, facts §5.4)."""
    h, w = pts3d.shape[:2]
    pts = pts3d.reshape(-1, 3).double()
    centre = torch.tensor([w / 2, h / 2], dtype=torch.float64, device=pts.device) if pp is None else pp.double()
    pixels = _pixel_grid(h, w, pts.device).double() - centre
    xy_over_z = (pts[:, :2] / pts[:, 2:3]).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    dot_xy_px = (xy_over_z * pixels).sum(-1)
    dot_xy_xy = xy_over_z.square().sum(-1)
    focal = dot_xy_px.mean() / dot_xy_xy.mean()
    for _ in range(WEISZFELD_ITERS):
        # inverse residual weights turn least squares into an L1 (median-like) fit
        weight = (pixels - focal * xy_over_z).norm(dim=-1).clamp_min(1e-8).reciprocal()
        focal = (weight * dot_xy_px).mean() / (weight * dot_xy_xy).mean()
    return max(float(focal), MIN_FOCAL)


# ---------------------------------------------------------------- MST initialisation


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


# ---------------------------------------------------------------- parameters and loss


@dataclass
class _Params:
    log_depth: torch.Tensor  # (N, A) per pixel, padded to the largest image area A
    im_pose: torch.Tensor  # (N, 7) quaternion xyzw, signed-log1p translation
    im_focal: torch.Tensor  # (N,) FOCAL_BREAK·log f
    pw_pose: torch.Tensor  # (E, 8) quaternion, signed-log1p translation, log scale

    def tensors(self) -> list[torch.Tensor]:
        return [self.log_depth, self.im_pose, self.im_focal, self.pw_pose]


@dataclass
class _Stacked:
    """Pair data flattened and padded to A pixels so that all edges run as one batch;
    padded pixels have weight 0."""

    grid: torch.Tensor  # (N, A, 2) pixel coordinates
    pp: torch.Tensor  # (N, 2) principal points, frozen at the image centre
    pred_i: torch.Tensor  # (E, A, 3)
    pred_j: torch.Tensor  # (E, A, 3)
    w_i: torch.Tensor  # (E, A) log(conf)
    w_j: torch.Tensor  # (E, A)
    ei: torch.Tensor  # (E,) long
    ej: torch.Tensor  # (E,)
    area_i: float  # total pixel count of the i-side images over all edges
    area_j: float


def _pad(maps: list[torch.Tensor], area: int) -> torch.Tensor:
    flat = [m.reshape(-1, *m.shape[2:]) for m in maps]
    out = flat[0].new_zeros((len(flat), area, *flat[0].shape[1:]))
    for k, f in enumerate(flat):
        out[k, : len(f)] = f
    return out


def _pixel_weights(conf: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """conf_trf 'log': log(conf) >= 0 since conf > 1 (the clamp only guards malformed
    input); a non-finite prediction gets weight 0 instead of poisoning the loss."""
    weight = conf.log().clamp_min(0).nan_to_num()
    return torch.where(torch.isfinite(pred).all(-1), weight, torch.zeros_like(weight))


def _stack(g: _PairGraph, device: torch.device) -> _Stacked:
    area = max(h * w for h, w in g.shapes)
    areas = [h * w for h, w in g.shapes]
    ei = torch.tensor([i for i, _ in g.edges], device=device)
    ej = torch.tensor([j for _, j in g.edges], device=device)
    return _Stacked(
        grid=_pad([_pixel_grid(h, w, device).reshape(h, w, 2) for h, w in g.shapes], area),
        pp=torch.tensor([[w / 2, h / 2] for h, w in g.shapes], device=device),
        pred_i=_pad(g.pred_i, area).nan_to_num(),
        pred_j=_pad(g.pred_j, area).nan_to_num(),
        w_i=_pad([_pixel_weights(c, x) for c, x in zip(g.conf_i, g.pred_i)], area),
        w_j=_pad([_pixel_weights(c, x) for c, x in zip(g.conf_j, g.pred_j)], area),
        ei=ei,
        ej=ej,
        area_i=float(sum(areas[i] for i, _ in g.edges)),
        area_j=float(sum(areas[j] for _, j in g.edges)),
    )


def _random_params(g: _PairGraph, area: int, seed: int, device: torch.device) -> _Params:
    """The optimiser's construction-time state (facts §5.2), from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    n, e = g.n_images, len(g.edges)
    params = _Params(
        log_depth=torch.randn(n, area, generator=gen) / 10 - 3,
        im_pose=torch.randn(n, 7, generator=gen),
        im_focal=torch.tensor([FOCAL_BREAK * math.log(max(hw)) for hw in g.shapes]),
        pw_pose=torch.randn(e, 8, generator=gen),
    )
    return _Params(*(t.to(device) for t in params.tensors()))


def _im_rigid(p: _Params) -> tuple[torch.Tensor, torch.Tensor]:
    return _quat_to_rotmat(p.im_pose[:, :4]), _signed_expm1(p.im_pose[:, 4:7])


def _edge_scales(p: _Params) -> torch.Tensor:
    # normalising by the mean log scale removes the scene's free global scale
    log_s = p.pw_pose[:, 7]
    return torch.exp(log_s - log_s.mean()) * BASE_SCALE


def _edge_sim3(p: _Params) -> tuple[torch.Tensor, torch.Tensor]:
    """Each edge's transform as (s·R, s·t): the scale multiplies the rotation and the
    translation rows alike, which is why the initialisation stores t / s."""
    s = _edge_scales(p)
    rot = _quat_to_rotmat(p.pw_pose[:, :4])
    return s[:, None, None] * rot, s[:, None] * _signed_expm1(p.pw_pose[:, 4:7])


def _focals(p: _Params) -> torch.Tensor:
    return torch.exp(p.im_focal / FOCAL_BREAK)


def _camera_points(p: _Params, st: _Stacked) -> torch.Tensor:
    """(N, A, 3) back-projection of every depth map in its own camera."""
    depth = p.log_depth.exp()[..., None]
    xy = depth * (st.grid - st.pp[:, None]) / _focals(p)[:, None, None]
    return torch.cat([xy, depth], dim=-1)


def _world_points(p: _Params, st: _Stacked) -> torch.Tensor:
    rot, trans = _im_rigid(p)
    return _transform(rot, trans, _camera_points(p, st))


def _alignment_loss(p: _Params, st: _Stacked) -> torch.Tensor:
    """Σ log(conf)·‖world point − edge-transformed prediction‖ (unsquared), i side and
    j side each divided by their total pixel counts (facts §5.3)."""
    world = _world_points(p, st)
    rot, trans = _edge_sim3(p)
    # index_select, unlike world[idx], back-propagates through index_add_ (several × faster)
    world_i, world_j = world.index_select(0, st.ei), world.index_select(0, st.ej)
    li = ((world_i - _transform(rot, trans, st.pred_i)).norm(dim=-1) * st.w_i).sum() / st.area_i
    lj = ((world_j - _transform(rot, trans, st.pred_j)).norm(dim=-1) * st.w_j).sum() / st.area_j
    return li + lj


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


# ---------------------------------------------------------------- evaluation


def _angle(sin_like: torch.Tensor, cos_like: torch.Tensor) -> torch.Tensor:
    # atan2 stays accurate near 0°, where acos of a cosine ≈ 1 loses half the digits
    return torch.rad2deg(torch.atan2(sin_like, cos_like))


def relative_pose_errors(est_cam2world: torch.Tensor, gt_cam2world: torch.Tensor) -> dict:
    """Per pair of images (a < b): the rotation error (degrees) of the relative pose
    a→b and the angle (degrees) between estimated and GT relative translation directions,
    which is free of the unknown scene scale. Returns lists per pair plus their means and
    maxima."""
    est = torch.as_tensor(est_cam2world, dtype=torch.float64)
    gt = torch.as_tensor(gt_cam2world, dtype=torch.float64)
    if est.shape != gt.shape or est.shape[1:] != (4, 4):
        raise ValueError(f"expected two (N, 4, 4) pose stacks (got {tuple(est.shape)} and {tuple(gt.shape)})")
    pairs = [(a, b) for a in range(len(est)) for b in range(a + 1, len(est))]
    rot_err, trans_err = [], []
    for a, b in pairs:
        rel_e = torch.linalg.inv(est[a]) @ est[b]
        rel_g = torch.linalg.inv(gt[a]) @ gt[b]
        delta = rel_e[:3, :3].T @ rel_g[:3, :3]
        skew = torch.stack([delta[2, 1] - delta[1, 2], delta[0, 2] - delta[2, 0], delta[1, 0] - delta[0, 1]])
        rot_err.append(float(_angle(skew.norm() / 2, (torch.trace(delta) - 1) / 2)))
        te, tg = rel_e[:3, 3], rel_g[:3, 3]
        trans_err.append(float(_angle(torch.linalg.cross(te, tg).norm(), te @ tg)))
    nan = math.nan
    return dict(
        pairs=pairs,
        rotation_deg=rot_err,
        translation_deg=trans_err,
        mean_rotation_deg=float(np.mean(rot_err)) if pairs else nan,
        mean_translation_deg=float(np.mean(trans_err)) if pairs else nan,
        max_rotation_deg=float(np.max(rot_err)) if pairs else nan,
        max_translation_deg=float(np.max(trans_err)) if pairs else nan,
    )
