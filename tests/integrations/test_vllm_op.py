"""The op the vLLM plugin calls, checked against a naive loop (needs torch only, not vLLM)."""

import pytest
import torch

import moe_plugin.integrations.vllm as mp_vllm


def naive_experts(x, w13, w2, weights, ids, expert_map=None, activation="silu"):
    """float64 loop over tokens and slots; slots whose expert is not local contribute zero."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    n = w2.shape[2]
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if expert_map is not None:
                e = int(expert_map[e])
                if e < 0:
                    continue
            h = w13[e].double() @ x[t].double()
            if activation == "silu":
                a = torch.nn.functional.silu(h[:n]) * h[n:]
            elif activation == "gelu":
                a = torch.nn.functional.gelu(h[:n]) * h[n:]
            else:
                a = torch.relu(h) ** 2
            out[t] += float(weights[t, j]) * (w2[e].double() @ a)
    return out


def make(e=6, n=32, k=48, m=9, top_k=2, rows=None, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    rows = 2 * n if rows is None else rows
    x = torch.randn(m, k, generator=g).to(dtype)
    w13 = (torch.randn(e, rows, k, generator=g) * 0.2).to(dtype)
    w2 = (torch.randn(e, k, n, generator=g) * 0.2).to(dtype)
    ids = torch.stack([torch.randperm(e, generator=g)[:top_k] for _ in range(m)]).to(torch.int32)
    weights = torch.rand(m, top_k, generator=g)
    return x, w13, w2, weights, ids


@pytest.mark.parametrize("activation", ["silu", "gelu", "relu2"])
def test_op_matches_naive_and_counts(activation):
    n = 32
    x, w13, w2, weights, ids = make(rows=n if activation == "relu2" else 2 * n)
    mp_vllm.build_layer_kernel("test.op." + activation, num_experts=6, top_k=2, w13=w13, w2=w2, activation=activation)
    before = mp_vllm.call_count()
    out = mp_vllm.vllm_experts(x, w13, w2, weights, ids, layer_name="test.op." + activation, activation=activation)
    assert mp_vllm.call_count() == before + 1
    torch.testing.assert_close(out.double(), naive_experts(x, w13, w2, weights, ids, activation=activation),
                               rtol=1e-4, atol=1e-4)


def test_expert_parallel_ranks_sum_to_full_layer():
    """vLLM's EP (no all2all kernel): every rank gets all tokens and its slice of experts with vLLM's
    expert_map; vLLM all-reduces the ranks' outputs. The ranks' outputs must sum to the full layer."""
    e = 8
    x, w13, w2, weights, ids = make(e=e, m=11, top_k=3, seed=1)
    full = naive_experts(x, w13, w2, weights, ids)
    total = torch.zeros_like(full)
    for rank in range(2):
        owned = list(range(rank * 4, rank * 4 + 4))
        expert_map = torch.full((e,), -1, dtype=torch.int32)
        expert_map[owned] = torch.arange(4, dtype=torch.int32)
        name = f"test.ep.rank{rank}"
        mp_vllm.build_layer_kernel(name, num_experts=e, top_k=3, w13=w13[owned], w2=w2[owned], activation="silu")
        out = mp_vllm.vllm_experts(
            x, w13[owned].contiguous(), w2[owned].contiguous(), weights, ids, layer_name=name, expert_map=expert_map
        )
        part = naive_experts(x, w13[owned], w2[owned], weights, ids, expert_map=expert_map)
        torch.testing.assert_close(out.double(), part, rtol=1e-4, atol=1e-4)
        total += out.double()
    torch.testing.assert_close(total, full, rtol=1e-4, atol=1e-4)


def test_op_compiles_without_graph_break():
    """torch.compile(fullgraph=True) fails on any graph break: the op must be opaque, with a fake impl."""
    x, w13, w2, weights, ids = make(seed=2)
    mp_vllm.build_layer_kernel("test.compile", num_experts=6, top_k=2, w13=w13, w2=w2, activation="silu")

    def layer(x, weights, ids):
        return mp_vllm.vllm_experts(x * 1.0, w13, w2, weights, ids, layer_name="test.compile") + 0.0

    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    before = mp_vllm.call_count()
    for m in (9, 5):
        out = compiled(x[:m], weights[:m], ids[:m])
        torch.testing.assert_close(out.double(), naive_experts(x[:m], w13, w2, weights[:m], ids[:m]),
                                   rtol=1e-4, atol=1e-4)
    assert mp_vllm.call_count() == before + 2


def test_unknown_layer_and_bad_input_raise():
    x, w13, w2, weights, ids = make(seed=3)
    with pytest.raises(KeyError, match="no moe_plugin kernel for vLLM layer 'test.missing'"):
        mp_vllm.vllm_experts(x, w13, w2, weights, ids, layer_name="test.missing")
    mp_vllm.build_layer_kernel("test.bad", num_experts=6, top_k=2, w13=w13, w2=w2, activation="silu")
    with pytest.raises(ValueError, match="topk_ids values must be in"):
        mp_vllm.vllm_experts(x, w13, w2, weights, ids + 6, layer_name="test.bad")
    with pytest.raises(ValueError, match="activation must be one of"):
        mp_vllm.build_layer_kernel("test.bad2", num_experts=6, top_k=2, w13=w13, w2=w2, activation="swiglu")


def test_env_switch(monkeypatch):
    for value, want in (("0", False), ("off", False), ("1", True), ("", True)):
        monkeypatch.setenv(mp_vllm.ENV_SWITCH, value)
        assert mp_vllm.enabled_by_env() is want
    monkeypatch.setenv(mp_vllm.ENV_SWITCH, "maybe")
    with pytest.raises(ValueError, match="MOE_PLUGIN_VLLM must be 1 or 0"):
        mp_vllm.enabled_by_env()
    monkeypatch.setenv(mp_vllm.ENV_SWITCH, "0")
    assert mp_vllm.register() is False


def fp8_roundtrip_groups(v, group=128):
    """A vector through float8_e4m3fn with one scale per ``group`` values (amax / 448), back to float64."""
    out = torch.empty(v.shape, dtype=torch.float64)
    for start in range(0, v.numel(), group):
        chunk = v[start : start + group].double()
        scale = max(chunk.abs().max().item(), 1e-12) / 448.0
        out[start : start + group] = (chunk / scale).float().to(torch.float8_e4m3fn).double() * scale
    return out


def test_fp8_block_op_matches_naive():
    """Block-FP8 weights (128x128 scales) with dynamic per-token, per-128-column activation quantization,
    as vLLM's block-FP8 checkpoints are served."""
    from moe_plugin.config import QuantConfig
    from moe_plugin.integrations import dequantize_fp8_block, quantize_fp8_block

    e, n, k, m = 4, 128, 256, 5
    x, w13, w2, weights, ids = make(e=e, n=n, k=k, m=m, seed=4)
    q13, s13 = zip(*(quantize_fp8_block(w) for w in w13))
    q2, s2 = zip(*(quantize_fp8_block(w) for w in w2))
    q13, s13, q2, s2 = torch.stack(q13), torch.stack(s13), torch.stack(q2), torch.stack(s2)
    assert s13.shape == (e, 2, 2) and s2.shape == (e, 2, 1)
    mp_vllm.build_layer_kernel("test.fp8", num_experts=e, top_k=2, w13=q13, w2=q2, activation="silu",
                               dtype=torch.float32, quant=QuantConfig.fp8_block(128))
    out = mp_vllm.vllm_experts(x, q13, q2, weights, ids, layer_name="test.fp8", w13_scale=s13, w2_scale=s2)

    want = torch.zeros(m, k, dtype=torch.float64)
    for t in range(m):
        xq = fp8_roundtrip_groups(x[t])
        for j in range(2):
            ex = int(ids[t, j])
            h = dequantize_fp8_block(q13[ex], s13[ex]).double() @ xq
            a = fp8_roundtrip_groups(torch.nn.functional.silu(h[:n]) * h[n:])
            want[t] += float(weights[t, j]) * (dequantize_fp8_block(q2[ex], s2[ex]).double() @ a)
    # fp8 rounding of values that sit on a rounding boundary may differ between two correct paths
    assert (out.double() - want).abs().max().item() < 1e-3 * want.abs().max().item()
    # ...and the FP8 weights / scales were really used: the bf16-weight result differs by more
    exact = naive_experts(x, w13, w2, weights, ids)
    assert (out.double() - exact).abs().max().item() > (out.double() - want).abs().max().item()


def test_fp8_checkpoint_claim():
    from moe_plugin.integrations.vllm import FP8_QUANTIZATION, claims_checkpoint

    block = {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
    assert claims_checkpoint(block, None)
    assert claims_checkpoint(block, FP8_QUANTIZATION)
    assert not claims_checkpoint(block, "fp8")  # the user named vLLM's own method
    assert not claims_checkpoint({"quant_method": "fp8", "activation_scheme": "static"}, None)  # per-tensor
    assert not claims_checkpoint({"quant_method": "awq", "weight_block_size": [128, 128]}, None)


def test_fp8_block_quantize_roundtrip():
    from moe_plugin.integrations import dequantize_fp8_block, quantize_fp8_block

    w = torch.randn(200, 130, generator=torch.Generator().manual_seed(6))
    q, scale = quantize_fp8_block(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape and scale.shape == (2, 2)
    # each block's largest magnitude maps to 448 (e4m3's max)
    assert torch.allclose(scale[1, 0], w[128:, :128].abs().max() / 448)
    back = dequantize_fp8_block(q, scale)
    for i in range(2):
        for j in range(2):
            block = (slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1)))
            # e4m3 keeps 3 mantissa bits: relative error <= 2**-4 of the value, plus subnormals near 0
            err = (back[block] - w[block]).abs()
            assert (err <= w[block].abs() * 2**-4 + scale[i, j] * 2**-9).all()
