"""Teacher experiment (issue 3, not kept): a last 512x384 stage where half the scenes are seen
by a level, backed-off stereo rig whose views have shallow depth ratios (95th/5th percentile
median 2.9, the Middlebury motorcycle's is 2.1). Put the last.pth of a finished `pqk teacher
train` (the bundled recipe's end state) into OUT first: the run resumes from it.

    python experiments/teacher_level_rig.py ratio          # depth ratios of the rig's views
    python experiments/teacher_level_rig.py train OUT      # ~10 min on 2 cores

Result (2026-11-22): motorcycle absrel/δ1 0.299/0.349 (v1: 0.315/0.327), workload
0.127/0.889 (v1: 0.107/0.890); log-depth slope on the motorcycle 0.38 (v1: 0.37)."""
import sys
from dataclasses import replace
import numpy as np
import pqk.data.scenes as S
import pqk.train.teacher as T


def level_scene(seed, n_views=8, width=512, height=384):
    layout = S._draw_layout(seed, n_views)
    rng = np.random.default_rng([seed, 2])
    room = layout.primitives[0]
    lo, hi = room.center - room.half, room.center + room.half
    p0 = layout.poses[0][:3, 3].astype(np.float64)
    away = np.array([p0[0], 0.0, p0[2]]); away /= np.linalg.norm(away)
    # back off towards the wall behind, staying 0.25 m inside the room
    room_lo, room_hi = lo + 0.25, hi - 0.25
    room_lo[1], room_hi[1] = -10, 10
    best = 0.0
    for t in np.linspace(0, 3.0, 61):
        q = p0 + t * away
        if np.all(q >= room_lo) and np.all(q <= room_hi):
            best = t
    pos = p0 + rng.uniform(0.5, 1.0) * best * away
    target = np.array([rng.uniform(-0.3, 0.3), pos[1] + rng.uniform(-0.1, 0.25), rng.uniform(-0.3, 0.3)])
    first = S._look_at(pos, target)
    spacing = float(rng.uniform(0.05, 0.15))
    poses = []
    for k in range(n_views):
        pose = first.copy()
        pose[:3, 3] += (k - (n_views - 1) / 2) * spacing * first[:3, 0]
        poses.append(pose.astype(np.float32))
    layout = replace(layout, poses=poses, hfov=float(np.deg2rad(rng.uniform(35.0, 50.0))))
    K = S._intrinsics(layout.hfov, width, height)
    views = [S._render(layout, S._Camera(K, pose), width, height) for pose in layout.poses]
    return S.Scene(name=f"gen-level-{seed:05d}", seed=seed, views=views)


def _scenes(seed_base, count, stage, views):
    n_level = round(count * stage.stereo_fraction)
    return [level_scene(seed_base + k, views, stage.width, stage.height) if k >= count - n_level
            else S.generate_scene(seed_base + k, n_views=views, width=stage.width, height=stage.height)
            for k in range(count)]


if __name__ == "__main__":
    if sys.argv[1] == "ratio":
        r = []
        for s in range(1_000_000, 1_000_010):
            sc = level_scene(s, 4, 128, 96)
            for v in sc.views:
                d = v.depth[v.depth > 0]; r.append(np.percentile(d, 95) / np.percentile(d, 5))
        print("level rig 95/5 depth ratio median", np.median(r).round(2), np.min(r).round(2), np.max(r).round(2))
    else:
        from pathlib import Path
        T._scenes = _scenes
        recipe = T.TeacherRecipe()
        recipe.stages.append(T.Stage(512, 384, 400, 2, 5e-5, 120, stereo_fraction=0.5))
        T.train_teacher(recipe, Path(sys.argv[2]))
