"""An independent re-statement of the official MixMAE pretraining forward (Sense-X/MixMIM).

Written for the conversion test only: it reproduces the official state-dict layout
(downsample at the end of stages 1-3, top-level decoder keys, persistent position and
index buffers) and the official semantics (one mask for the whole batch, image ``i``
paired with image ``B-1-i`` via ``flip(0)``, cross-image logits pushed down by 1e30,
2x2 merges concatenated as (0,0), (1,0), (0,1), (1,1)). It shares no code with
``mixmae_core`` apart from timm's MLP/ViT block and the sin-cos table.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Block

from mixmae_core.layers import sincos_2d


def _rel_index(ws: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


class _Attention(nn.Module):
    def __init__(self, dim, heads, ws):
        super().__init__()
        self.heads, self.ws = heads, ws
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, heads))
        self.register_buffer("relative_position_index", _rel_index(ws))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, group):
        n, t, c = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(t, t, -1)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        g = group.reshape(n, 1, 1, t)
        different = 1 - (g * g.transpose(2, 3) + (1 - g) * (1 - g).transpose(2, 3))
        attn = (attn - 1e30 * different).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(n, t, c))


def _windows(x, ws):
    b, h, w, c = x.shape
    return x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)


def _unwindows(x, ws, h, w):
    c = x.shape[-1]
    b = x.shape[0] // ((h // ws) * (w // ws))
    return x.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h * w, c)


class _Block(nn.Module):
    def __init__(self, dim, heads, res, ws):
        super().__init__()
        self.res, self.ws = res, min(ws, res)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads, self.ws)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x, group):
        b, _, c = x.shape
        y = _windows(self.norm1(x).view(b, self.res, self.res, c), self.ws)
        g = _windows(group.expand(b, -1, -1).reshape(b, self.res, self.res, 1), self.ws)
        x = x + _unwindows(self.attn(y, g), self.ws, self.res, self.res)
        return x + self.mlp(self.norm2(x))


class _Merge(nn.Module):
    def __init__(self, res, dim):
        super().__init__()
        self.res = res
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        b, _, c = x.shape
        x = x.view(b, self.res, self.res, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class _Layer(nn.Module):
    def __init__(self, dim, depth, heads, res, ws, merge):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(dim, heads, res, ws) for _ in range(depth))
        self.downsample = _Merge(res, dim) if merge else None

    def forward(self, x, group):
        for blk in self.blocks:
            x = blk(x, group)
        return self.downsample(x) if self.downsample is not None else x


class _PatchEmbed(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, 4, 4)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class OfficialMixMIM(nn.Module):
    def __init__(self, img_size, embed_dim, depths, num_heads, window_size, dec_dim, dec_depth, dec_heads):
        super().__init__()
        self.img_size = img_size
        self.patch_embed = _PatchEmbed(embed_dim)
        res = img_size // 4
        self.layers = nn.ModuleList(
            _Layer(embed_dim * 2**i, depths[i], num_heads[i], res // 2**i, window_size[i], i < len(depths) - 1)
            for i in range(len(depths))
        )
        feats = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(feats)
        self.out = img_size // 32
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.absolute_pos_embed = nn.Parameter(sincos_2d((res, res), embed_dim).view(1, -1, embed_dim), requires_grad=False)
        self.decoder_pos_embed = nn.Parameter(
            sincos_2d((self.out, self.out), dec_dim).view(1, -1, dec_dim), requires_grad=False
        )
        self.decoder_embed = nn.Linear(feats, dec_dim)
        self.decoder_blocks = nn.ModuleList(
            Block(dec_dim, dec_heads, 4.0, qkv_bias=True, norm_layer=nn.LayerNorm) for _ in range(dec_depth)
        )
        self.decoder_norm = nn.LayerNorm(dec_dim)
        self.decoder_pred = nn.Linear(dec_dim, 32 * 32 * 3)

    def forward(self, x, mask):
        """``mask``: ``(h, w)`` float, 1 where image i shows image B-1-i. Returns the loss."""
        imgs = x
        res = self.img_size // 4
        masks = [
            F.interpolate(mask[None, None], size=(res // 2**i, res // 2**i), mode="nearest").reshape(1, -1, 1)
            for i in range(4)
        ]
        x = self.patch_embed(x)
        x = x * (1 - masks[0]) + x.flip(0) * masks[0]
        x = x + self.absolute_pos_embed
        for layer, m in zip(self.layers, masks):
            x = layer(x, m)
        z = self.decoder_embed(self.norm(x))
        m = masks[3]
        tok = self.mask_token.expand(z.shape[0], z.shape[1], -1)
        d = torch.cat([z * (1 - m) + tok * m, z * m + tok * (1 - m)]) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            d = blk(d)
        rec = self.decoder_pred(self.decoder_norm(d))
        b = imgs.shape[0]
        h = self.out
        target = imgs.reshape(b, 3, h, 32, h, 32).permute(0, 2, 4, 3, 5, 1).reshape(b, h * h, -1)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        unmixed = rec[:b] * m + rec[b:].flip(0) * (1 - m)
        return ((unmixed - target) ** 2).mean()
