"""Global alignment (facts §5) on synthetic scenes whose cameras and geometry are known.

The scene is a few planes ray-cast from cameras on an arc. Pair results are built like
DUSt3R's: view 1 = image i in camera i, view 2 = image j in camera i, each pair at its own
random scale (as a network's pairs are), constant confidence 5.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

import pqk.recon.global_alignment as ga
from pqk.data.pairs import make_pair_indices
from pqk.errors import InputError
from pqk.recon.global_alignment import AlignmentResult, global_alignment, relative_pose_errors
from pqk.tasks.dust3r.metrics import apply_sim3, umeyama_sim3

F64 = torch.float64
# (unit normal n, offset c) of planes n·X = c, world frame with y down
PLANES = [
    ((0.0, 0.0, -1.0), -2.0),  # back wall at z = 2
    ((0.0, -1.0, 0.0), -1.0),  # floor at y = 1
    ((0.5, 0.2, -1.0), -0.3),  # slanted panel in front of the wall
]


def _look_at(centre: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """OpenCV cam2world: z towards the target, y pointing down the world y axis."""
    z = (target - centre) / (target - centre).norm()
    x = torch.linalg.cross(torch.tensor([0.0, 1.0, 0.0], dtype=F64), z)
    x = x / x.norm()
    pose = torch.eye(4, dtype=F64)
    pose[:3, :3] = torch.stack([x, torch.linalg.cross(z, x), z], dim=1)
    pose[:3, 3] = centre
    return pose


def _rays(h: int, w: int, focal: float) -> torch.Tensor:
    """Camera-frame rays with z = 1, principal point at (W/2, H/2) as the aligner assumes."""
    v, u = torch.meshgrid(torch.arange(h, dtype=F64), torch.arange(w, dtype=F64), indexing="ij")
    return torch.stack([(u - w / 2) / focal, (v - h / 2) / focal, torch.ones_like(u)], dim=-1)


def _depth(pose: torch.Tensor, focal: float, h: int, w: int) -> torch.Tensor:
    rays = _rays(h, w, focal) @ pose[:3, :3].T
    depth = torch.full((h, w), math.inf, dtype=F64)
    for normal, offset in PLANES:
        n = torch.tensor(normal, dtype=F64)
        c, n = offset / n.norm(), n / n.norm()
        t = (c - n @ pose[:3, 3]) / (rays @ n)  # rays have z = 1 in camera, so t is the depth
        depth = torch.where((t > 0) & (t < depth), t, depth)
    assert torch.isfinite(depth).all()
    return depth


class Scene:
    def __init__(self, n: int, shapes: list[tuple[int, int]] | None = None, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.shapes = shapes or [(24, 32)] * n
        poses, focals, depths = [], [], []
        for k, (h, w) in enumerate(self.shapes):
            angle = math.radians(-40 + 80 * k / max(n - 1, 1))
            centre = torch.tensor([3 * math.sin(angle), -0.3 + 0.1 * (k % 2), -3 * math.cos(angle)], dtype=F64)
            target = torch.rand(3, generator=gen, dtype=F64) * 0.4 - 0.2
            poses.append(_look_at(centre, target))
            focals.append((26.0 + 1.5 * k) * max(h, w) / 32)
            depths.append(_depth(poses[-1], focals[-1], h, w))
        self.cam2world = torch.stack(poses)
        self.focals = torch.tensor(focals, dtype=F64)
        self.depths = depths
        self.world = [
            (_rays(*d.shape, f) * d[..., None]) @ p[:3, :3].T + p[:3, 3] for d, f, p in zip(depths, focals, poses)
        ]

    def pair_results(self, graph: str, noise: float = 0.0, seed: int = 1) -> list[dict]:
        gen = torch.Generator().manual_seed(seed)
        results = []
        for i, j in make_pair_indices(len(self.shapes), graph):
            world2cam = torch.linalg.inv(self.cam2world[i])
            scale = float(torch.empty(1, dtype=F64).uniform_(0.5, 2.0, generator=gen))
            preds = []
            for k in (i, j):
                pts = scale * (self.world[k] @ world2cam[:3, :3].T + world2cam[:3, 3])
                if noise:
                    pts = pts * (1 + noise * torch.randn(pts.shape, generator=gen, dtype=F64))
                preds.append(pts.float())
            results.append({
                "view1": {"idx": i},
                "view2": {"idx": j},
                "pred1": {"pts3d": preds[0], "conf": torch.full(self.shapes[i], 5.0)},
                "pred2": {"pts3d_in_other_view": preds[1], "conf": torch.full(self.shapes[j], 5.0)},
            })  # fmt: skip
        return results


def _sim3_residual(scene: Scene, result: AlignmentResult) -> float:
    """Largest distance between estimated world points mapped by the best Sim(3) and GT,
    relative to the GT scene's extent."""
    est = torch.cat([p.reshape(-1, 3) for p in result.pts3d]).double()
    gt = torch.cat([p.reshape(-1, 3) for p in scene.world])
    s, rot, t = umeyama_sim3(est, gt)
    extent = float((gt - gt.mean(0)).norm(dim=-1).max())
    return float(np.abs(apply_sim3(est, s, rot, t) - gt.numpy()).max()) / extent


def _focal_error(scene: Scene, result: AlignmentResult) -> float:
    return float(((result.focals.double() - scene.focals) / scene.focals).abs().max())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These problems are a few thousand points: extra threads only add synchronisation,
    which costs seconds per call when the cores are shared with another job."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def scene5() -> Scene:
    return Scene(5)


def test_recovers_noise_free_scene(scene5: Scene) -> None:
    start = time.perf_counter()
    result = global_alignment(scene5.pair_results("swin-2"), niter=300)
    elapsed = time.perf_counter() - start
    errors = relative_pose_errors(result.cam2world, scene5.cam2world)
    assert len(errors["pairs"]) == 10
    assert errors["max_rotation_deg"] < 1.0
    assert errors["max_translation_deg"] < 2.0
    assert _focal_error(scene5, result) < 0.02
    assert _sim3_residual(scene5, result) < 2e-3
    assert result.n_iterations == 300 and math.isfinite(result.final_loss)
    assert elapsed < 20, f"5 views at 32×24, 300 iterations took {elapsed:.1f}s"


def test_mst_initialisation_alone_is_exact(scene5: Scene) -> None:
    result = global_alignment(scene5.pair_results("swin-2"), niter=0)
    errors = relative_pose_errors(result.cam2world, scene5.cam2world)
    assert errors["max_rotation_deg"] < 1e-3
    assert errors["max_translation_deg"] < 1e-3
    assert _focal_error(scene5, result) < 1e-4
    assert _sim3_residual(scene5, result) < 1e-5
    assert result.final_loss < 1e-4


def test_result_is_consistent_and_normalised(scene5: Scene) -> None:
    result = global_alignment(scene5.pair_results("swin-2"), niter=20)
    assert result.cam2world.shape == (5, 4, 4) and result.focals.shape == (5,)
    torch.testing.assert_close(result.principal_points, torch.tensor([[16.0, 12.0]] * 5))
    rot = result.cam2world[:, :3, :3]
    torch.testing.assert_close(rot @ rot.transpose(1, 2), torch.eye(3).expand(5, 3, 3), atol=1e-5, rtol=0)
    for k in range(5):
        # world points = pose · back-projected depth with the returned focal and centre
        cam = _rays(24, 32, float(result.focals[k])).float() * result.depthmaps[k][..., None]
        world = cam @ result.cam2world[k, :3, :3].T + result.cam2world[k, :3, 3]
        torch.testing.assert_close(world, result.pts3d[k], atol=1e-4, rtol=1e-4)
        assert result.confidence[k].shape == (24, 32) and bool(result.masks[k].all())


def test_noisy_predictions_converge(scene5: Scene) -> None:
    pairs = scene5.pair_results("swin-2", noise=0.02)
    start = global_alignment(pairs, niter=0)
    result = global_alignment(pairs, niter=300, schedule="linear")
    assert result.final_loss < start.final_loss
    errors = relative_pose_errors(result.cam2world, scene5.cam2world)
    assert errors["max_rotation_deg"] < 1.5
    assert errors["max_translation_deg"] < 3.0
    assert _focal_error(scene5, result) < 0.03
    assert _sim3_residual(scene5, result) < 0.05


def test_optimisation_recovers_from_a_perturbed_start(scene5: Scene) -> None:
    """Drives the internals: MST start, then poses, focals and depths disturbed, so that
    the 300 Adam steps have a real error to remove."""
    device = torch.device("cpu")
    graph = ga._read_pairs(scene5.pair_results("swin-2"), None, device)
    stacked = ga._stack(graph, device)
    params = ga._random_params(graph, stacked.grid.shape[1], 42, device)
    ga._init_mst(params, graph, graph.im_conf(), 3.0)
    gen = torch.Generator().manual_seed(3)
    params.im_pose[1:, :4] += 0.01 * torch.randn(4, 4, generator=gen)
    params.im_pose[1:, 4:] += 0.02 * torch.randn(4, 3, generator=gen)
    params.im_focal += ga.FOCAL_BREAK * 0.02 * torch.randn(5, generator=gen)
    params.log_depth += 0.05 * torch.randn(params.log_depth.shape, generator=gen)
    loss_before = float(ga._alignment_loss(params, stacked))
    start = ga._result(params, stacked, graph, graph.im_conf(), 0, 3.0)
    before = relative_pose_errors(start.cam2world, scene5.cam2world)
    ga._optimise(params, stacked, 300, 0.01, "cosine", None)
    result = ga._result(params, stacked, graph, graph.im_conf(), 300, 3.0)
    after = relative_pose_errors(result.cam2world, scene5.cam2world)
    assert before["max_rotation_deg"] > 2.0
    assert result.final_loss < loss_before / 100
    assert after["max_rotation_deg"] < 1.0
    assert after["max_translation_deg"] < 2.0
    assert _focal_error(scene5, result) < 0.02


def test_non_symmetrised_graph_places_every_camera(scene5: Scene) -> None:
    """Camera 4 is view 1 of no pair here, so only a PnP on its placed points can pose it."""
    pairs = [r for r in scene5.pair_results("swin-2") if r["view1"]["idx"] < r["view2"]["idx"]]
    assert all(r["view1"]["idx"] != 4 for r in pairs)
    start = global_alignment(pairs, niter=0)
    errors = relative_pose_errors(start.cam2world, scene5.cam2world)
    assert errors["max_rotation_deg"] < 1e-3 and errors["max_translation_deg"] < 1e-3
    assert _focal_error(scene5, start) < 1e-4
    result = global_alignment(pairs, niter=100)
    errors = relative_pose_errors(result.cam2world, scene5.cam2world)
    assert errors["max_rotation_deg"] < 1.0 and errors["max_translation_deg"] < 2.0
    assert _focal_error(scene5, result) < 0.02


def test_two_images() -> None:
    scene = Scene(2)
    calls: list[int] = []
    result = global_alignment(scene.pair_results("complete"), niter=100, progress=calls.append)
    assert calls == list(range(1, 101))
    errors = relative_pose_errors(result.cam2world, scene.cam2world)
    assert errors["max_rotation_deg"] < 1.0 and errors["max_translation_deg"] < 2.0
    assert _focal_error(scene, result) < 0.02


def test_images_of_different_shapes() -> None:
    scene = Scene(3, shapes=[(24, 32), (32, 24), (16, 32)])
    result = global_alignment(scene.pair_results("complete"), niter=100)
    assert [tuple(d.shape) for d in result.depthmaps] == scene.shapes
    torch.testing.assert_close(result.principal_points, torch.tensor([[16.0, 12.0], [12.0, 16.0], [16.0, 8.0]]))
    errors = relative_pose_errors(result.cam2world, scene.cam2world)
    assert errors["max_rotation_deg"] < 1.0 and errors["max_translation_deg"] < 2.0
    assert _focal_error(scene, result) < 0.02
    assert _sim3_residual(scene, result) < 2e-3


def test_deterministic(scene5: Scene) -> None:
    pairs = scene5.pair_results("swin-2", noise=0.01)
    a = global_alignment(pairs, niter=10, init="none", seed=7)
    b = global_alignment(pairs, niter=10, init="none", seed=7)
    c = global_alignment(pairs, niter=10, init="none", seed=8)
    assert torch.equal(a.cam2world, b.cam2world) and a.final_loss == b.final_loss
    assert not torch.equal(a.cam2world, c.cam2world)


def test_rejects_bad_graphs(scene5: Scene) -> None:
    pairs = scene5.pair_results("swin-2")
    disconnected = [r for r in pairs if {r["view1"]["idx"], r["view2"]["idx"]} in ({0, 1}, {2, 3})]
    with pytest.raises(InputError, match="not connected"):
        global_alignment(disconnected, n_images=4, niter=0)
    with pytest.raises(InputError, match="appear in no pair"):
        global_alignment(pairs, n_images=6, niter=0)
    with pytest.raises(ValueError):
        global_alignment(pairs, schedule="step")


def test_schedules_and_focal_estimate() -> None:
    assert ga._lr_at(0.0, 0.01, "cosine") == pytest.approx(0.01)
    assert ga._lr_at(0.5, 0.01, "cosine") == pytest.approx((0.01 + 1e-6) / 2)
    assert ga._lr_at(1.0, 0.01, "linear") == pytest.approx(1e-6)
    depth = torch.rand(24, 32, generator=torch.Generator().manual_seed(0), dtype=F64) + 1
    assert ga.estimate_focal((_rays(24, 32, 41.5) * depth[..., None]).float()) == pytest.approx(41.5, rel=1e-5)


def test_quaternion_round_trip() -> None:
    rots = Rotation.random(20, random_state=0).as_matrix()
    quats = torch.tensor(np.stack([ga._rotmat_to_quat(r) for r in rots]))
    torch.testing.assert_close(ga._quat_to_rotmat(quats), torch.tensor(rots), atol=1e-12, rtol=0)
    # scipy also orders quaternions (x, y, z, w)
    about_z = ga._quat_to_rotmat(torch.tensor(Rotation.from_rotvec([0, 0, 0.3]).as_quat()))
    assert about_z[0, 1] == pytest.approx(-math.sin(0.3))


def test_relative_pose_errors_known_values() -> None:
    scene = Scene(3)
    est = scene.cam2world.clone()
    est[:, :3, 3] *= 3.0  # a global scale changes no direction
    assert max(relative_pose_errors(est, scene.cam2world)["rotation_deg"]) < 1e-9
    assert max(relative_pose_errors(est, scene.cam2world)["translation_deg"]) < 1e-6
    est[2, :3, :3] = est[2, :3, :3] @ torch.tensor(Rotation.from_rotvec([0, math.radians(5), 0]).as_matrix())
    errors = relative_pose_errors(est, scene.cam2world)
    assert errors["pairs"] == [(0, 1), (0, 2), (1, 2)]
    assert errors["rotation_deg"] == pytest.approx([0.0, 5.0, 5.0], abs=1e-9)
