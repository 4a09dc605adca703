"""DUSt3R (Wang et al., CVPR 2024): a shared ViT encoder, two cross-attending decoders,
one dense head per view. Written from ../shared/design/dust3r-facts.md; parameter
names match the official state_dict so official checkpoints load strictly.
"""

from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from pqk.models.dust3r.config import Dust3rConfig
from pqk.models.dust3r.heads import DPTPts3d, LinearPts3d

LAYER_NORM_EPS = 1e-6


def layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=LAYER_NORM_EPS)


# --- 2D rotary position embedding --------------------------------------------------------


class Rope2D(nn.Module):
    """RoPE on (row, column) patch positions: the first half of each head is rotated by the
    row index, the second half by the column index; within a half, element i pairs with
    i + half/2 ("rotate half" layout)."""

    def __init__(self, base: float):
        super().__init__()
        self.base = base

    def _rotate(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        # x: (B, nh, N, h), pos: (B, N) integer positions
        h = x.shape[-1]
        inv_freq = 1.0 / (self.base ** (torch.arange(0, h, 2, device=x.device).float() / h))
        # Angles in float32 then cast, as the official table is built.
        angles = (pos.float()[:, :, None] * inv_freq).to(x.dtype)  # (B, N, h/2)
        angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, N, h)
        x1, x2 = x.chunk(2, dim=-1)
        return x * angles.cos() + torch.cat((-x2, x1), dim=-1) * angles.sin()

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        y_half, x_half = x.chunk(2, dim=-1)
        return torch.cat((self._rotate(y_half, pos[:, :, 0]), self._rotate(x_half, pos[:, :, 1])), dim=-1)


# --- transformer blocks -------------------------------------------------------------------


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    B, N, _ = x.shape
    return x.reshape(B, N, num_heads, -1).transpose(1, 2)  # (B, nh, N, hd)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    B, nh, N, hd = x.shape
    return x.transpose(1, 2).reshape(B, N, nh * hd)


def attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype | None,
                   smooth_k: bool = False) -> torch.Tensor:
    """softmax(q·kᵀ/√d)·v, optionally computed in `dtype` (bf16 runtimes); result in q's dtype.

    `smooth_k` subtracts k's mean over tokens first (SageAttention's K smoothing): every score
    of a query drops by the same q·mean(k), which softmax ignores, so the output is unchanged
    while k's range, and with it an 8-bit quantizer's step, shrinks (pqk.methods attn8)."""
    if smooth_k:
        k = k - k.mean(dim=-2, keepdim=True)
    if dtype is None or dtype == q.dtype:
        return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype)).to(q.dtype)


class Attention(nn.Module):
    """Self-attention with a fused qkv Linear; width = num_heads * head_dim (may be < dim once pruned)."""

    core_dtype: torch.dtype | None = None  # set by reduced-precision runtimes (backends.torch_int8)
    smooth_k: bool = False  # set by 8-bit attention (attention_core)

    def __init__(self, dim: int, num_heads: int, head_dim: int, rope: Rope2D):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim)
        self.proj = nn.Linear(num_heads * head_dim, dim)
        self.rope = rope

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, nh, N, hd)
        q, k = self.rope(q, pos), self.rope(k, pos)
        return self.proj(merge_heads(attention_core(q, k, v, self.core_dtype, self.smooth_k)))


class CrossAttention(nn.Module):
    """Queries from this view, keys/values from the other; RoPE uses each side's own positions."""

    core_dtype: torch.dtype | None = None
    smooth_k: bool = False

    def __init__(self, dim: int, num_heads: int, head_dim: int, rope: Rope2D):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        inner = num_heads * head_dim
        self.projq = nn.Linear(dim, inner)
        self.projk = nn.Linear(dim, inner)
        self.projv = nn.Linear(dim, inner)
        self.proj = nn.Linear(inner, dim)
        self.rope = rope

    def forward(self, x: torch.Tensor, mem: torch.Tensor, xpos: torch.Tensor, mpos: torch.Tensor) -> torch.Tensor:
        q = self.rope(split_heads(self.projq(x), self.num_heads), xpos)
        k = self.rope(split_heads(self.projk(mem), self.num_heads), mpos)
        v = split_heads(self.projv(mem), self.num_heads)
        return self.proj(merge_heads(attention_core(q, k, v, self.core_dtype, self.smooth_k)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as official


class Block(nn.Module):
    """Pre-norm encoder block."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, mlp_hidden: int, rope: Rope2D):
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = Attention(dim, num_heads, head_dim, rope)
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), pos)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """Self-attention, cross-attention to the other view's previous-layer tokens, MLP."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        cross_heads: int,
        head_dim: int,
        mlp_hidden: int,
        rope: Rope2D,
        norm_mem: bool,
    ):
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = Attention(dim, num_heads, head_dim, rope)
        self.cross_attn = CrossAttention(dim, cross_heads, head_dim, rope)
        self.norm2 = layer_norm(dim)
        self.norm3 = layer_norm(dim)
        self.mlp = Mlp(dim, mlp_hidden)
        # The memory gets its own LayerNorm when norm_im2_in_dec (all DUSt3R models).
        self.norm_y = layer_norm(dim) if norm_mem else nn.Identity()

    def forward(self, x: torch.Tensor, y: torch.Tensor, xpos: torch.Tensor, ypos: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), xpos)
        mem = self.norm_y(y)
        x = x + self.cross_attn(self.norm2(x), mem, xpos, ypos)
        return x + self.mlp(self.norm3(x))


# --- patch embedding ----------------------------------------------------------------------


def patch_positions(batch: int, hp: int, wp: int, device: torch.device) -> torch.Tensor:
    """(batch, hp*wp, 2) integer (row, column) positions, row-major like the token order."""
    rows = torch.arange(hp, device=device)
    cols = torch.arange(wp, device=device)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(1, hp * wp, 2)
    return grid.expand(batch, -1, -1)


class PatchEmbed(nn.Module):
    """16x16 stride-16 conv, no norm. `many_ar` reproduces the training-time ManyAR_PatchEmbed:
    a landscape-stored batch whose portrait images (by true_shape) are transposed back first."""

    def __init__(self, enc_dim: int, patch_size: int, many_ar: bool):
        super().__init__()
        self.patch_size = patch_size
        self.many_ar = many_ar
        self.proj = nn.Conv2d(3, enc_dim, patch_size, stride=patch_size)

    def forward(self, img: torch.Tensor, true_shape: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, _, H, W = img.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
        if not self.many_ar:
            x = self.proj(img).flatten(2).transpose(1, 2)  # (B, N, C)
            return x, patch_positions(B, H // p, W // p, img.device)
        portrait = true_shape[:, 0] > true_shape[:, 1]
        x = self.proj(img).flatten(2).transpose(1, 2)
        pos = patch_positions(B, H // p, W // p, img.device).clone()
        if bool(portrait.any()):
            x = x.clone()
            x[portrait] = self.proj(img[portrait].transpose(-1, -2)).flatten(2).transpose(1, 2)
            pos[portrait] = patch_positions(1, W // p, H // p, img.device)
        return x, pos


# --- the network --------------------------------------------------------------------------


def _widths(cfg: Dust3rConfig, key: str, depth: int, default: int) -> list[int]:
    return list(cfg.block_widths.get(key, [default] * depth))


class AsymmetricCroCo3DStereo(nn.Module):
    """DUSt3R. `model(view1, view2)` -> (res1, res2) with the official keys."""

    def __init__(self, config: Dust3rConfig):
        super().__init__()
        cfg = self.config = config
        enc_rope = Rope2D(cfg.rope_base)
        dec_rope = Rope2D(cfg.rope_base)
        enc_hidden = int(cfg.enc_embed_dim * cfg.mlp_ratio)
        dec_hidden = int(cfg.dec_embed_dim * cfg.mlp_ratio)

        # Registration order mirrors the official state_dict.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dec_embed_dim))  # training-only, kept for strict keys
        self.patch_embed = PatchEmbed(cfg.enc_embed_dim, cfg.patch_size, cfg.patch_embed_cls == "ManyAR_PatchEmbed")
        self.enc_blocks = nn.ModuleList(
            Block(cfg.enc_embed_dim, h, cfg.enc_head_dim, m, enc_rope)
            for h, m in zip(
                _widths(cfg, "enc_heads", cfg.enc_depth, cfg.enc_num_heads),
                _widths(cfg, "enc_mlp_hidden", cfg.enc_depth, enc_hidden),
            )
        )
        self.enc_norm = layer_norm(cfg.enc_embed_dim)
        self.decoder_embed = nn.Linear(cfg.enc_embed_dim, cfg.dec_embed_dim)
        self.dec_blocks = self._decoder_stack("dec1", dec_rope, dec_hidden)
        self.dec_norm = layer_norm(cfg.dec_embed_dim)
        self.dec_blocks2 = self._decoder_stack("dec2", dec_rope, dec_hidden)
        self.downstream_head1 = self._head()
        self.downstream_head2 = self._head()
        self._init_weights()

    def _decoder_stack(self, name: str, rope: Rope2D, hidden: int) -> nn.ModuleList:
        cfg = self.config
        heads = _widths(cfg, f"{name}_heads", cfg.dec_depth, cfg.dec_num_heads)
        cross = _widths(cfg, f"{name}_cross_heads", cfg.dec_depth, cfg.dec_num_heads)
        mlp = _widths(cfg, f"{name}_mlp_hidden", cfg.dec_depth, hidden)
        return nn.ModuleList(
            DecoderBlock(cfg.dec_embed_dim, h, c, cfg.dec_head_dim, m, rope, cfg.norm_im2_in_dec)
            for h, c, m in zip(heads, cross, mlp)
        )

    def _head(self) -> nn.Module:
        cfg = self.config
        if cfg.head_type == "linear":
            return LinearPts3d(cfg.dec_embed_dim, cfg.patch_size, cfg.conf_mode)
        dims_in = [cfg.enc_embed_dim] + [cfg.dec_embed_dim] * 3
        return DPTPts3d(cfg.dpt_hooks, dims_in, cfg.patch_size, cfg.conf_mode)

    def _init_weights(self) -> None:
        # CroCo's init: xavier-uniform Linear and patch conv (as a matrix), zero biases,
        # unit LayerNorms; the DPT convs keep PyTorch's default.
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.mask_token, std=0.02)
        for name, module in self.named_modules():
            if name.startswith("downstream_head") and not isinstance(module, nn.Linear):
                continue
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # --- official-style state_dict loading: copy dec_blocks to dec_blocks2 for CroCo weights
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if not any(k.startswith("dec_blocks2.") for k in state_dict):
            state_dict = dict(state_dict)
            for k, v in list(state_dict.items()):
                if k.startswith("dec_blocks."):
                    state_dict["dec_blocks2." + k[len("dec_blocks."):]] = v
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # --- forward pieces, public so tests and distillation can read intermediate tokens

    def encode_image(self, img: torch.Tensor, true_shape: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, pos = self.patch_embed(img, true_shape)  # (B, N, enc_dim), (B, N, 2)
        for blk in self.enc_blocks:
            x = blk(x, pos)
        return self.enc_norm(x), pos

    def encode_pair(self, view1: dict, view2: dict):
        """Encoder tokens and positions of both views (one batched call when shapes agree)."""
        img1, img2 = view1["img"], view2["img"]
        shape1, shape2 = true_shape_of(view1), true_shape_of(view2)
        if img1.shape[-2:] == img2.shape[-2:]:
            x, pos = self.encode_image(torch.cat((img1, img2)), torch.cat((shape1, shape2)))
            feat1, feat2 = x.chunk(2)
            pos1, pos2 = pos.chunk(2)
        else:
            feat1, pos1 = self.encode_image(img1, shape1)
            feat2, pos2 = self.encode_image(img2, shape2)
        return (shape1, shape2), (feat1, feat2), (pos1, pos2)

    def decode(self, feat1, pos1, feat2, pos2) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per view, the list the heads read: [encoder output, block 1, ..., block L (normalized)]."""
        out1, out2 = [feat1], [feat2]
        x1, x2 = self.decoder_embed(feat1), self.decoder_embed(feat2)
        for blk1, blk2 in zip(self.dec_blocks, self.dec_blocks2):
            # Simultaneous update: both blocks read the previous layer of both views.
            x1, x2 = blk1(x1, x2, pos1, pos2), blk2(x2, x1, pos2, pos1)
            out1.append(x1)
            out2.append(x2)
        out1[-1] = self.dec_norm(out1[-1])
        out2[-1] = self.dec_norm(out2[-1])
        return out1, out2

    def run_head(self, head: nn.Module, decout: list[torch.Tensor], true_shape: torch.Tensor) -> dict:
        """Call a head with the image size it must decode, with the official portrait rules."""
        if not self.config.landscape_only:
            H, W = (int(v) for v in true_shape[0])
            return head(decout, (H, W))
        # landscape_only: decode each orientation with its own grid, then swap the spatial
        # axes of portrait outputs so they line up with a landscape-stored batch.
        height, width = true_shape[:, 0], true_shape[:, 1]
        H, W = int(true_shape.min()), int(true_shape.max())
        landscape = width >= height
        if bool(landscape.all()):
            return head(decout, (H, W))
        if not bool(landscape.any()):
            return _transposed(head(decout, (W, H)))
        res_l = head([d[landscape] for d in decout], (H, W))
        res_p = _transposed(head([d[~landscape] for d in decout], (W, H)))
        out = {}
        for k in res_l:
            merged = res_l[k].new_empty((len(landscape),) + tuple(res_l[k].shape[1:]))
            merged[landscape] = res_l[k]
            merged[~landscape] = res_p[k]
            out[k] = merged
        return out

    def forward(self, view1: dict, view2: dict) -> tuple[dict, dict]:
        (shape1, shape2), (feat1, feat2), (pos1, pos2) = self.encode_pair(view1, view2)
        return self.forward_tokens((shape1, shape2), (feat1, feat2), (pos1, pos2))

    def forward_tokens(self, shapes: tuple, feats: tuple, poses: tuple) -> tuple[dict, dict]:
        """forward() from the views' encoder tokens (as `encode_pair` returns them): the decoders and
        heads, which depend on the pair; a scene's encoder tokens can be computed once per view."""
        (shape1, shape2), (feat1, feat2), (pos1, pos2) = shapes, feats, poses
        dec1, dec2 = self.decode(feat1, pos1, feat2, pos2)
        # Heads run in float32 even under autocast (confidence overflows in half precision).
        with torch.autocast(device_type=feat1.device.type, enabled=False):
            res1 = self.run_head(self.downstream_head1, [t.float() for t in dec1], shape1)
            res2 = self.run_head(self.downstream_head2, [t.float() for t in dec2], shape2)
        res2["pts3d_in_other_view"] = res2.pop("pts3d")
        return res1, res2


def _transposed(res: dict) -> dict:
    return {k: v.swapaxes(1, 2) for k, v in res.items()}


def true_shape_of(view: dict) -> torch.Tensor:
    """(B, 2) int (H, W) per image; derived from the tensor when the view has none."""
    img = view["img"]
    shape = view.get("true_shape")
    if shape is None:
        return torch.tensor(img.shape[-2:], device=img.device).expand(img.shape[0], 2)
    shape = torch.as_tensor(shape, device=img.device)
    return shape.reshape(-1, 2).expand(img.shape[0], 2) if shape.numel() == 2 else shape


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (the DPT convs reachable under two names count once)."""
    return sum(p.numel() for p in model.parameters())


__all__ = ["AsymmetricCroCo3DStereo", "Dust3rConfig", "count_parameters", "true_shape_of"]
