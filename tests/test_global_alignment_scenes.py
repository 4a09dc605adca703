"""Global alignment fed with ground-truth pointmaps of generated scenes recovers the cameras."""

from __future__ import annotations

import numpy as np
import torch

from pqk.data.pairs import make_pair_indices
from pqk.data.scenes import generate_scene
from pqk.recon.global_alignment import global_alignment, relative_pose_errors
from pqk.tasks.dust3r.metrics import chamfer


def _gt_pair_results(scene, indices):
    results = []
    for i, j in indices:
        pts_i, valid_i, pts_j, valid_j = scene.pair_gt(i, j)
        results.append({
            "view1": {"idx": i}, "view2": {"idx": j},
            "pred1": {"pts3d": torch.from_numpy(pts_i), "conf": torch.from_numpy(np.where(valid_i, 5.0, 1.0).astype(np.float32))},
            "pred2": {"pts3d_in_other_view": torch.from_numpy(pts_j), "conf": torch.from_numpy(np.where(valid_j, 5.0, 1.0).astype(np.float32))},
        })
    return results


def test_ground_truth_pointmaps_give_ground_truth_poses():
    scene = generate_scene(7, n_views=5, width=64, height=48)
    results = _gt_pair_results(scene, make_pair_indices(5, "swin-2", symmetrize=True))
    out = global_alignment(results, n_images=5, niter=100, seed=42)
    gt_poses = torch.from_numpy(np.stack([v.cam2world for v in scene.views])).double()
    errors = relative_pose_errors(out.cam2world.double(), gt_poses)
    assert errors["max_rotation_deg"] < 1.0, errors
    assert errors["max_translation_deg"] < 2.0, errors
    gt_focal = np.array([v.intrinsics[0, 0] for v in scene.views])
    assert np.allclose(out.focals.numpy(), gt_focal, rtol=0.03)
    pred = np.concatenate([p.numpy().reshape(-1, 3) for p in out.pts3d])
    gt = np.concatenate([v.pts3d.reshape(-1, 3) for v in scene.views])
    cd = chamfer(pred, gt, align=True, correspondences=(pred, gt))
    extent = np.linalg.norm(gt.max(0) - gt.min(0))
    assert cd["chamfer"] < 0.01 * extent
