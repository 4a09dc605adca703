"""The global-alignment scene as optimisable parameters (per-image depth, pose and
focal, per-edge similarity), the pair data stacked into one padded batch, and the
confidence-weighted alignment loss between them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pqk.recon.camera_geometry import _pixel_grid, _quat_to_rotmat, _signed_expm1, _transform
from pqk.recon.pair_graph import _PairGraph

FOCAL_BREAK = 20.0  # focals live as 20·log f: one Adam step moves a focal ~20× less than a log-depth
BASE_SCALE = 0.5  # geometric mean of the edge scales; fixes the scene's free global scale


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
