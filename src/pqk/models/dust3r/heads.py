"""Output heads: linear (pixel shuffle) and DPT, plus the exp depth/confidence post-processing."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Fixed in the official DPT head whatever the backbone width.
DPT_FEATURE_DIM = 256
DPT_LAST_DIM = 128
DPT_LAYER_DIMS = (96, 192, 384, 768)


def postprocess(out: torch.Tensor, conf_mode: tuple) -> dict[str, torch.Tensor]:
    """(B, 4, H, W) raw head output -> pts3d (B, H, W, 3) and conf (B, H, W)."""
    fmap = out.permute(0, 2, 3, 1)
    xyz = fmap[..., 0:3]
    # 'exp' depth mode: keep the direction, map the length r through expm1.
    r = xyz.norm(dim=-1, keepdim=True)
    pts3d = xyz / r.clip(min=1e-8) * torch.expm1(r)
    _, vmin, vmax = conf_mode
    conf = vmin + fmap[..., 3].exp().clip(max=vmax - vmin)
    return {"pts3d": pts3d, "conf": conf}


class LinearPts3d(nn.Module):
    """One Linear per token to 4 values for each of its patch_size**2 pixels."""

    def __init__(self, dec_dim: int, patch_size: int, conf_mode: tuple):
        super().__init__()
        self.patch_size = patch_size
        self.conf_mode = conf_mode
        self.proj = nn.Linear(dec_dim, 4 * patch_size**2)

    def forward(self, decout: list[torch.Tensor], img_shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        H, W = img_shape
        p = self.patch_size
        tokens = decout[-1]  # (B, N, dec_dim)
        B = tokens.shape[0]
        feat = self.proj(tokens).transpose(-1, -2).reshape(B, -1, H // p, W // p)  # (B, 4*p*p, Hp, Wp)
        feat = F.pixel_shuffle(feat, p)  # (B, 4, H, W)
        return postprocess(feat, self.conf_mode)


class ResidualConvUnit(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Not in place: the skip must add the unactivated input.
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.out_conv = nn.Conv2d(dim, dim, 1)
        self.resConfUnit1 = ResidualConvUnit(dim)
        self.resConfUnit2 = ResidualConvUnit(dim)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class Upsample2x(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class DPTScratch(nn.Module):
    def __init__(self, layer_dims: tuple[int, ...], dim: int):
        super().__init__()
        convs = [nn.Conv2d(d, dim, 3, padding=1, bias=False) for d in layer_dims]
        self.layer1_rn, self.layer2_rn, self.layer3_rn, self.layer4_rn = convs
        # The official module tree reaches the same convs under a second name, so the
        # state_dict has both keys; registering them twice keeps strict loading exact.
        self.layer_rn = nn.ModuleList(convs)
        self.refinenet1 = FusionBlock(dim)
        self.refinenet2 = FusionBlock(dim)
        self.refinenet3 = FusionBlock(dim)
        self.refinenet4 = FusionBlock(dim)


class DPTAdapter(nn.Module):
    """Dense prediction head reading four token sets (encoder output, three decoder depths)."""

    def __init__(self, hooks: list[int], dims_in: list[int], patch_size: int):
        super().__init__()
        self.hooks = hooks
        self.patch_size = patch_size
        d0, d1, d2, d3 = DPT_LAYER_DIMS
        self.scratch = DPTScratch(DPT_LAYER_DIMS, DPT_FEATURE_DIM)
        self.head = nn.Sequential(
            nn.Conv2d(DPT_FEATURE_DIM, DPT_FEATURE_DIM // 2, 3, padding=1),
            Upsample2x(),
            nn.Conv2d(DPT_FEATURE_DIM // 2, DPT_LAST_DIM, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(DPT_LAST_DIM, 4, 1),
        )
        self.act_postprocess = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(dims_in[0], d0, 1), nn.ConvTranspose2d(d0, d0, 4, stride=4)),
                nn.Sequential(nn.Conv2d(dims_in[1], d1, 1), nn.ConvTranspose2d(d1, d1, 2, stride=2)),
                nn.Sequential(nn.Conv2d(dims_in[2], d2, 1)),
                nn.Sequential(nn.Conv2d(dims_in[3], d3, 1), nn.Conv2d(d3, d3, 3, stride=2, padding=1)),
            ]
        )

    def forward(self, decout: list[torch.Tensor], img_shape: tuple[int, int]) -> torch.Tensor:
        H, W = img_shape
        hp, wp = H // self.patch_size, W // self.patch_size
        layers = []
        for i, hook in enumerate(self.hooks):
            tokens = decout[hook]  # (B, hp*wp, C), row-major
            grid = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, hp, wp)
            layers.append(self.scratch.layer_rn[i](self.act_postprocess[i](grid)))
        l1, l2, l3, l4 = layers
        # Odd token grids: the stride-2 branch comes back one row/column too big.
        p4 = self.scratch.refinenet4(l4)[:, :, : l3.shape[2], : l3.shape[3]]
        p3 = self.scratch.refinenet3(p4, l3)
        p2 = self.scratch.refinenet2(p3, l2)
        p1 = self.scratch.refinenet1(p2, l1)
        return self.head(p1)  # (B, 4, H, W)


class DPTPts3d(nn.Module):
    def __init__(self, hooks: list[int], dims_in: list[int], patch_size: int, conf_mode: tuple):
        super().__init__()
        self.conf_mode = conf_mode
        self.dpt = DPTAdapter(hooks, dims_in, patch_size)

    def forward(self, decout: list[torch.Tensor], img_shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        return postprocess(self.dpt(decout, img_shape), self.conf_mode)
