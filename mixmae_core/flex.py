"""FlexAttention as an attention implementation (``attn_impl="flex"``): the relative
position bias is read inside the kernel and the segment mask is a block mask.

Its own module, imported on first use: importing FlexAttention loads torch's inductor
(seconds of start-up in every Ray Train worker that never uses it).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from mixmae_core.models.attention import AttentionContext, AttentionImpl, register_attention

_compiled_flex = torch.compile(flex_attention, dynamic=False)


class FlexAttention(AttentionImpl):
    name = "flex"

    def prepare(self, context: AttentionContext) -> AttentionContext:
        segments = context.segments
        if segments is None:
            return replace(context, prepared=None)

        def same_segment(b, h, q_idx, kv_idx):
            return segments[b, q_idx] == segments[b, kv_idx]

        S, n = segments.shape
        return replace(context, prepared=create_block_mask(same_segment, S, None, n, n, device=segments.device))

    def attend(self, q, k, v, rel_bias, context, scale, dropout_p=0.0):
        if dropout_p:
            raise ValueError("flex attention has no attention dropout: set attn_drop_rate=0 or use attn_impl='sdpa'")
        positions = context.positions
        if positions is None:

            def add_bias(score, b, h, q_idx, kv_idx):
                return score + rel_bias[h, q_idx, kv_idx]

        else:

            def add_bias(score, b, h, q_idx, kv_idx):
                return score + rel_bias[h, positions[b, q_idx], positions[b, kv_idx]]

        # inside a compiled block dynamo lowers flex itself; eager GPU calls need the compiled
        # kernel (eager flex is the dense reference math, which is what CPU tests want)
        run = _compiled_flex if q.is_cuda and not torch.compiler.is_compiling() else flex_attention
        return run(q, k, v, score_mod=add_bias, block_mask=context.prepared, scale=scale)


register_attention(FlexAttention())
