"""Independent naive references for the tests: plain loops over tokens and slots, float64 math.

Nothing here imports moe_plugin, so a bug in the package cannot hide in its own reference.
"""

from __future__ import annotations

import math

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def act(name: str, h: torch.Tensor) -> torch.Tensor:
    if name == "relu2":
        return torch.relu(h) ** 2
    n = h.shape[-1] // 2
    gate, up = h[..., :n], h[..., n:]
    if name == "silu":
        return gate * torch.sigmoid(gate) * up
    if name == "gelu":
        return 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2))) * up
    if name == "swiglu":
        gate = gate.clamp(max=7.0)
        up = up.clamp(-7.0, 7.0)
        return gate * torch.sigmoid(1.702 * gate) * (up + 1)
    raise ValueError(name)


def quant_groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """Round-trip a 1-D vector through FP8 with one scale per ``group`` values (as fused kernels do)."""
    out = torch.empty_like(x, dtype=torch.float64)
    for start in range(0, x.numel(), group):
        chunk = x[start : start + group].double()
        scale = max(chunk.abs().max().item(), 1e-10) / FP8_MAX
        q = (chunk / scale).clamp(-FP8_MAX, FP8_MAX).float().to(FP8).double()
        out[start : start + group] = q * scale
    return out


def dequant_blocks(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    rows, cols = w.shape
    out = torch.empty(rows, cols, dtype=torch.float64)
    for i in range(rows):
        for jb in range(0, cols, block[1]):
            out[i, jb : jb + block[1]] = w[i, jb : jb + block[1]].double() * scale[i // block[0], jb // block[1]].item()
    return out


def moe(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
    expert_map: torch.Tensor | None = None,
    w1_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block: tuple[int, int] | None = None,
    apply_router_weight_on_input: bool = False,
) -> torch.Tensor:
    """out[t] = sum_j w[t,j] * W2[e] act(W1[e] x[t]) over slots whose expert is local (float64).

    With ``block`` the weights are FP8 with block scales, and activations are round-tripped through FP8
    per token per ``block[1]`` columns before each GEMM.
    """
    m, k_hidden = x.shape
    out = torch.zeros(m, k_hidden, dtype=torch.float64)
    dq = {}
    for t in range(m):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            if expert_map is not None:
                e = int(expert_map[e])
                if e < 0:
                    continue
            if block is not None:
                if e not in dq:
                    dq[e] = (dequant_blocks(w1[e], w1_scale[e], block), dequant_blocks(w2[e], w2_scale[e], block))
                W1, W2 = dq[e]
            else:
                W1, W2 = w1[e].double(), w2[e].double()
            xt = x[t].double()
            if apply_router_weight_on_input:
                xt = (x[t].float() * topk_weights[t, j].float()).to(x.dtype).double()
            if block is not None:
                xt = quant_groups(xt, block[1])
            a = act(activation, W1 @ xt)
            if block is not None:
                a = quant_groups(a.to(x.dtype).double() if x.dtype != torch.float32 else a, block[1])
            y = W2 @ a
            out[t] += y if apply_router_weight_on_input else topk_weights[t, j].double() * y
    return out


def topk_softmax(logits: torch.Tensor, k: int, renormalize: bool, scoring: str = "softmax"):
    weights, ids = [], []
    for row in logits.double():
        s = torch.softmax(row, -1) if scoring == "softmax" else torch.sigmoid(row)
        order = sorted(range(len(s)), key=lambda i: (-s[i].item(), i))[:k]
        w = torch.tensor([s[i].item() for i in order], dtype=torch.float64)
        if renormalize:
            w = w / w.sum()
        weights.append(w)
        ids.append(order)
    return torch.stack(weights) if weights else torch.empty(0, k), torch.tensor(ids).reshape(-1, k)


def grouped_topk(logits, k, renormalize, groups, topk_group, scoring, scale, bias):
    out_w, out_ids = [], []
    e = logits.shape[1]
    per = e // groups
    for row in logits.double():
        s = torch.softmax(row, -1) if scoring == "softmax" else torch.sigmoid(row)
        choice = s + bias.double() if bias is not None else s
        gscore = []
        for g in range(groups):
            vals = sorted(choice[g * per : (g + 1) * per].tolist(), reverse=True)
            gscore.append(sum(vals[:2]) if bias is not None else vals[0])
        keep = sorted(range(groups), key=lambda g: (-gscore[g], g))[:topk_group]
        cand = [i for i in range(e) if i // per in keep]
        order = sorted(cand, key=lambda i: (-choice[i].item(), i))[:k]
        w = torch.tensor([s[i].item() for i in order], dtype=torch.float64)
        if renormalize:
            w = w / w.sum()
        out_w.append(w * scale)
        out_ids.append(order)
    return torch.stack(out_w), torch.tensor(out_ids)
