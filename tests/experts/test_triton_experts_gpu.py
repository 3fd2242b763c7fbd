"""Triton experts on a CUDA GPU: bf16 and FP8 against a float32 reference written here, the batched
layout, expert parallelism's expert_map, and CUDA-graph capture replayed with changing valid-token counts.
"""

from __future__ import annotations

import pytest
import torch

from moe_plugin import ExpertWeights, ModularKernel, MoEConfig, QuantConfig
from moe_plugin.config import QuantScheme
from moe_plugin.experts.batched_triton import BatchedTritonExperts
from moe_plugin.experts.triton import TritonExperts
from moe_plugin.ops import fused_moe as fm
from moe_plugin.ops.fused_moe import fused_experts_triton
from moe_plugin.prepare_finalize.local import BatchedLocalPrepareAndFinalize, LocalPrepareAndFinalize

pytestmark = pytest.mark.gpu
DEV = "cuda"
FP8 = torch.float8_e4m3fn

# name: (global experts, local experts, top_k, hidden K, intermediate N)
SHAPES = {
    "qwen3": (128, 128, 8, 2048, 768),
    "mixtral-small": (8, 8, 2, 1024, 3584),
    "dsv3-shard-small": (64, 8, 8, 1024, 512),
}


@pytest.fixture(autouse=True)
def no_overrides(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(fm.FORCE_CONFIG_ENV, raising=False)


def rel_err(out, ref):
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def quant_groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """Round-trip through FP8 per row per ``group`` columns (fp32 scales), returned dequantized."""
    rows, cols = x.shape
    pad = (-cols) % group
    xf = torch.nn.functional.pad(x.float(), (0, pad)).view(rows, -1, group)
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-10) / 448.0
    q = (xf / scale).clamp(-448.0, 448.0).to(FP8).float() * scale
    return q.view(rows, -1)[:, :cols]


def quant_blocks(w: torch.Tensor, block: int = 128):
    """FP8 weights with one scale per ``block x block`` tile: (q, scales, dequantized)."""
    e, r, c = w.shape
    rb, cb = -(-r // block), -(-c // block)
    wp = torch.nn.functional.pad(w.float(), (0, cb * block - c, 0, rb * block - r)).view(e, rb, block, cb, block)
    scale = wp.abs().amax(dim=(2, 4)).clamp_min(1e-10) / 448.0
    q = (wp / scale[:, :, None, :, None]).clamp(-448, 448).to(FP8)
    deq = (q.float() * scale[:, :, None, :, None]).view(e, rb * block, cb * block)[:, :r, :c]
    q = q.view(e, rb * block, cb * block)[:, :r, :c].contiguous()
    return q, scale.contiguous(), deq


def reference(x, w1, w2, w, ids, expert_map=None, fp8_block=None, out_dtype=torch.bfloat16):
    """float32 experts, vectorized per local expert. ``fp8_block`` = (w1_deq, w2_deq): activations are
    round-tripped through FP8 per token per 128 columns before each GEMM, as the kernels do."""
    torch.backends.cuda.matmul.allow_tf32 = False
    m, k = x.shape
    top_k = ids.shape[1]
    loc = ids.long()
    if expert_map is not None:
        loc = expert_map.long()[loc]
    flat = loc.flatten()
    out = torch.zeros(m, k, dtype=torch.float32, device=x.device)
    xf = quant_groups(x, 128) if fp8_block is not None else x.float()
    for e in torch.unique(flat[flat >= 0]).tolist():
        slots = torch.nonzero(flat == e).flatten()
        tok = slots // top_k
        W1, W2 = (fp8_block[0][e], fp8_block[1][e]) if fp8_block is not None else (w1[e].float(), w2[e].float())
        h = xf[tok] @ W1.t()
        n = h.shape[1] // 2
        a = torch.nn.functional.silu(h[:, :n]) * h[:, n:]
        if fp8_block is not None:
            a = quant_groups(a.to(out_dtype), 128)
        out.index_add_(0, tok, (a @ W2.t()) * w.flatten()[slots, None].float())
    return out


def make_tokens(shape, m, seed, dtype=torch.bfloat16):
    e_global, _, top_k, k, _ = SHAPES[shape]
    g = torch.Generator(device=DEV).manual_seed(1000 + seed)
    x = torch.randn(m, k, generator=g, device=DEV).to(dtype)
    logits = torch.randn(m, e_global, generator=g, device=DEV)
    w, ids = torch.topk(torch.softmax(logits, -1), top_k)
    return x, w.float().contiguous(), ids.to(torch.int32).contiguous()


def make(shape, m, seed=0, dtype=torch.bfloat16):
    e_global, e_local, top_k, k, n = SHAPES[shape]
    g = torch.Generator(device=DEV).manual_seed(seed)
    w1 = (torch.randn(e_local, 2 * n, k, generator=g, device=DEV) * k**-0.5).to(dtype)
    w2 = (torch.randn(e_local, k, n, generator=g, device=DEV) * n**-0.5).to(dtype)
    x, w, ids = make_tokens(shape, m, seed, dtype)
    expert_map = None
    if e_local != e_global:
        expert_map = torch.full((e_global,), -1, dtype=torch.int32, device=DEV)
        expert_map[e_local : 2 * e_local] = torch.arange(e_local, dtype=torch.int32, device=DEV)
    return x, w1, w2, w, ids, expert_map, e_global


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("m", [1, 8, 64, 300])
def test_bf16_matches_fp32_reference(shape, m):
    x, w1, w2, w, ids, emap, e_global = make(shape, m)
    out = fused_experts_triton(x, w1, w2, w, ids, expert_map=emap, global_num_experts=e_global)
    torch.cuda.synchronize()
    assert rel_err(out, reference(x, w1, w2, w, ids, emap)) < 1.5e-2


def test_bf16_prefill_tiles():
    # 4096 tokens on the qwen3 shape: 128-row tiles, 8 warps, grouped raster (the prefill configs).
    x, w1, w2, w, ids, emap, e_global = make("qwen3", 4096, seed=1)
    cfg = fm.get_launch_config(4096, num_local=128, num_global=128, n=768, k=2048, top_k=8,
                               dtype=torch.bfloat16, quant=QuantConfig(), device=DEV)
    out = fused_experts_triton(x, w1, w2, w, ids, config=cfg)
    assert rel_err(out, reference(x, w1, w2, w, ids)) < 1.5e-2


@pytest.mark.parametrize("persistent,split_k", [(True, 1), (False, 4)])
def test_persistent_grid_and_split_k(persistent, split_k):
    x, w1, w2, w, ids, emap, e_global = make("mixtral-small", 96, seed=2)
    cfg = fm.LaunchConfig(
        fm.GemmLaunch(32, 64, 64, group_m=4, num_warps=4, num_stages=3),
        fm.GemmLaunch(32, 64, 64, group_m=4, num_warps=4, num_stages=3, split_k=split_k),
        routing="sorted",
        persistent=persistent,
    )
    out = fused_experts_triton(x, w1, w2, w, ids, config=cfg)
    assert rel_err(out, reference(x, w1, w2, w, ids)) < 1.5e-2


@pytest.mark.parametrize("shape", ["qwen3", "dsv3-shard-small"])
@pytest.mark.parametrize("m", [1, 64, 1024])
def test_fp8_block_matches_quant_aware_reference(shape, m):
    x, w1, w2, w, ids, emap, e_global = make(shape, m, seed=3)
    w1q, w1s, w1d = quant_blocks(w1)
    w2q, w2s, w2d = quant_blocks(w2)
    out = fused_experts_triton(
        x, w1q, w2q, w, ids, w1_scale=w1s, w2_scale=w2s, quant=QuantConfig.fp8_block(),
        expert_map=emap, global_num_experts=e_global,
    )
    assert rel_err(out, reference(x, w1, w2, w, ids, emap, fp8_block=(w1d, w2d))) < 3e-2
    # Against the unquantized math too: the FP8 error, not a wrong result.
    assert rel_err(out, reference(x, w1, w2, w, ids, emap)) < 0.1


@pytest.mark.parametrize("per_act_token", [False, True])
def test_fp8_per_tensor_and_per_channel(per_act_token):
    x, w1, w2, w, ids, emap, e_global = make("mixtral-small", 40, seed=4)
    dims = (2,) if per_act_token else (1, 2)
    w1s = (w1.float().abs().amax(dim=dims, keepdim=True) / 448.0)
    w2s = (w2.float().abs().amax(dim=dims, keepdim=True) / 448.0)
    w1q, w2q = (w1.float() / w1s).to(FP8), (w2.float() / w2s).to(FP8)
    if not per_act_token:
        w1s, w2s = w1s.reshape(-1), w2s.reshape(-1)
    quant = QuantConfig(QuantScheme.FP8_W8A8, None, per_act_token=per_act_token)
    out = fused_experts_triton(x, w1q, w2q, w, ids, w1_scale=w1s.contiguous(), w2_scale=w2s.contiguous(), quant=quant)
    assert rel_err(out, reference(x, w1, w2, w, ids)) < 0.08


@pytest.mark.parametrize("quantized", [False, True])
def test_batched_through_modular_kernel(quantized):
    x, w1, w2, w, ids, emap, e_global = make("dsv3-shard-small", 48, seed=5)
    _, e_local, top_k, k, n = SHAPES["dsv3-shard-small"]
    if quantized:
        w1q, w1s, w1d = quant_blocks(w1)
        w2q, w2s, w2d = quant_blocks(w2)
        weights, quant, ref = ExpertWeights(w1q, w2q, w1s, w2s), QuantConfig.fp8_block(), (w1d, w2d)
    else:
        weights, quant, ref = ExpertWeights(w1, w2), QuantConfig(), None
    cfg = MoEConfig(e_global, top_k, k, n, dtype=torch.bfloat16, quant=quant, max_num_tokens=64)
    kernel = ModularKernel(BatchedLocalPrepareAndFinalize(quant, 64, e_local), BatchedTritonExperts(cfg))
    out = kernel(x, weights, w, ids, expert_map=emap, global_num_experts=e_global)
    assert rel_err(out, reference(x, w1, w2, w, ids, emap, fp8_block=ref)) < (3e-2 if quantized else 1.5e-2)


@pytest.mark.parametrize("max_tokens,shape", [(16, "dsv3-shard-small"), (512, "qwen3"), (256, "mixtral-small")])
def test_cuda_graph_serves_every_batch_size(max_tokens, shape):
    """One graph captured for ``max_tokens``; replays with 1..max valid tokens read on the device."""
    x, w1, w2, w, ids, emap, e_global = make(shape, max_tokens, seed=6)
    valid = torch.tensor([max_tokens], dtype=torch.int32, device=DEV)
    out = torch.empty_like(x)
    kw = dict(expert_map=emap, global_num_experts=e_global, out=out, valid_tokens=valid,
              num_tokens_hint=max(1, max_tokens // 4), check_inputs=False)
    replay_with_counts(shape, (x, w1, w2, w, ids, emap), valid, kw, ((1, 7), (max_tokens // 3, 8), (max_tokens, 9)))


def replay_with_counts(shape, case, valid, kw, counts_and_seeds):
    """Capture ``fused_experts_triton`` once, then replay it on new tokens with each valid count: the
    valid rows must match the reference and the rest of ``kw["out"]`` must stay untouched."""
    x, w1, w2, w, ids, emap = case
    out = kw["out"]
    fused_experts_triton(x, w1, w2, w, ids, **kw)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused_experts_triton(x, w1, w2, w, ids, **kw)
    for v, seed in counts_and_seeds:
        nx, nw, nids = make_tokens(shape, x.shape[0], seed)
        x.copy_(nx)
        w.copy_(nw)
        ids.copy_(nids)
        valid.fill_(v)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out[:v], reference(x[:v], w1, w2, w[:v], ids[:v], emap)) < 1.5e-2, v
        assert torch.isnan(out[v:]).all(), v


TMA_CFG = fm.LaunchConfig(
    fm.GemmLaunch(128, 128, 64, group_m=8, num_warps=8, num_stages=4),
    fm.GemmLaunch(128, 256, 64, group_m=8, num_warps=8, num_stages=3),
    routing="sorted",
)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (9, 0), reason="TMA needs sm90+")
@pytest.mark.parametrize("tma,persistent", [("weights", False), ("weights", True), ("all", False), ("all", True)])
@pytest.mark.parametrize("shape,m", [("mixtral-small", 700), ("qwen3", 1024), ("dsv3-shard-small", 2000)])
def test_tma_path_matches_fp32_reference(shape, m, tma, persistent):
    from dataclasses import replace

    x, w1, w2, w, ids, emap, e_global = make(shape, m, seed=12)
    cfg = replace(TMA_CFG, tma=tma, persistent=persistent)
    out = fused_experts_triton(x, w1, w2, w, ids, expert_map=emap, global_num_experts=e_global, config=cfg)
    pointer = fused_experts_triton(x, w1, w2, w, ids, expert_map=emap, global_num_experts=e_global,
                                   config=replace(cfg, tma="off"))
    torch.cuda.synchronize()
    assert rel_err(out, reference(x, w1, w2, w, ids, emap)) < 1.5e-2
    # same tiles, same K order: the two loaders must give the same sums
    assert rel_err(out, pointer) < 1e-3


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (9, 0), reason="TMA needs sm90+")
@pytest.mark.parametrize("tma", ["weights", "all"])
def test_tma_path_in_a_cuda_graph_with_changing_counts(tma):
    from dataclasses import replace

    max_tokens = 1024
    x, w1, w2, w, ids, emap, e_global = make("mixtral-small", max_tokens, seed=13)
    valid = torch.tensor([max_tokens], dtype=torch.int32, device=DEV)
    out = torch.empty_like(x)
    kw = dict(expert_map=emap, global_num_experts=e_global, out=out, valid_tokens=valid, check_inputs=False,
              config=replace(TMA_CFG, tma=tma))
    replay_with_counts("mixtral-small", (x, w1, w2, w, ids, emap), valid, kw, ((1, 14), (333, 15), (max_tokens, 16)))


def test_modular_kernel_graph_capture():
    x, w1, w2, w, ids, emap, e_global = make("qwen3", 24, seed=10)
    _, e_local, top_k, k, n = SHAPES["qwen3"]
    cfg = MoEConfig(e_global, top_k, k, n, dtype=torch.bfloat16)
    kernel = ModularKernel(LocalPrepareAndFinalize(cfg.quant), TritonExperts(cfg))
    weights = ExpertWeights(w1, w2)
    eager = kernel(x, weights, w, ids)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = kernel(x, weights, w, ids, check_inputs=False)
    nx, nw, nids = make_tokens("qwen3", 24, 11)
    x.copy_(nx)
    w.copy_(nw)
    ids.copy_(nids)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(captured, reference(x, w1, w2, w, ids)) < 1.5e-2
    assert rel_err(eager, captured) > 1e-3  # the replay computed the new inputs, not the captured ones


def test_oracle_picks_triton_on_gpu():
    from moe_plugin.oracle import select

    cfg = MoEConfig(128, 8, 2048, 768, dtype=torch.bfloat16)
    sel = select(cfg, DEV)
    verdict = next(v for v in sel.experts_verdicts if v.name == "triton")
    assert verdict.ok, verdict.reason
