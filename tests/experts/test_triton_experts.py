"""TritonExperts / BatchedTritonExperts on CPU through Triton's interpreter, against the torch reference
experts (and, for a few cases, the independent per-token loop in tests/naive.py).

``moe_plugin.ops`` kernels follow ``TRITON_INTERPRET`` at launch time (``ops._jit.kernel``), so setting the
variable per test really runs the kernels in the interpreter; ``test_kernels_really_interpreted`` checks
that. Shapes stay tiny: the interpreter executes every program in numpy.
"""

from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch

import naive
from moe_plugin import ExpertWeights, ModularKernel, MoEConfig, QuantConfig
from moe_plugin.config import ParallelConfig, QuantScheme, ScaleFormat
from moe_plugin.experts.batched_triton import BatchedTritonExperts
from moe_plugin.experts.torch_ref import BatchedTorchExperts, TorchExperts
from moe_plugin.experts.triton import TritonExperts
from moe_plugin.oracle import Capabilities
from moe_plugin.ops import fused_moe as fm
from moe_plugin.ops import launch_config
from moe_plugin.ops.fused_moe import GemmLaunch, LaunchConfig, fused_experts_triton
from moe_plugin.ops.quant import quantize_block_weight
from moe_plugin.prepare_finalize.local import BatchedLocalPrepareAndFinalize, LocalPrepareAndFinalize

FP8 = torch.float8_e4m3fn


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(fm.FORCE_CONFIG_ENV, raising=False)
    monkeypatch.delenv(fm.CONFIG_DIR_ENV, raising=False)


def rel_err(out, ref):
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def small_cfg(bm=16, bn=16, bk=16, *, bn2=None, routing="auto", split_k=1, group_m=1, persistent=False):
    return LaunchConfig(
        GemmLaunch(bm, bn, bk, group_m=group_m),
        GemmLaunch(bm, bn2 or bn, bk, group_m=group_m, split_k=split_k),
        routing=routing,
        persistent=persistent,
    )


def make_case(m, e, top_k, hidden, inter, activation="silu", dtype=torch.float16, seed=0, repeat_ids=False):
    g = torch.Generator().manual_seed(seed)
    rows = inter if activation == "relu2" else 2 * inter
    x = torch.randn(m, hidden, generator=g).to(dtype)
    w1 = (torch.randn(e, rows, hidden, generator=g) * hidden**-0.5).to(dtype)
    w2 = (torch.randn(e, hidden, inter, generator=g) * inter**-0.5).to(dtype)
    if repeat_ids:
        ids = torch.randint(0, e, (m, top_k), generator=g)
    else:
        ids = torch.stack([torch.randperm(e, generator=g)[:top_k] for _ in range(m)]) if m else torch.empty(0, top_k)
    weights = torch.rand(m, top_k, generator=g)
    return x, w1, w2, weights, ids.to(torch.int32)


def moe_config(e, top_k, hidden, inter, dtype, activation="silu", quant=QuantConfig(), **kw):
    return MoEConfig(e, top_k, hidden, inter, dtype=dtype, activation=activation, quant=quant, **kw)


def run_standard(experts, cfg, x, weights, w, ids, **kw):
    return ModularKernel(LocalPrepareAndFinalize(cfg.quant), experts)(x, weights, w, ids, **kw)


@contextlib.contextmanager
def torch_ops():
    """The references run every op on its torch path, independent of the Triton kernels under test."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def reference(cfg, x, weights, w, ids, **kw):
    with torch_ops():
        return run_standard(TorchExperts(cfg), cfg, x, weights, w, ids, **kw)


def test_kernels_really_interpreted(monkeypatch):
    # A call-through spy on the interpreter's launcher: every kernel launch of the pipeline goes there.
    from triton.runtime.interpreter import InterpretedFunction

    launched = []
    original = InterpretedFunction.run

    def spy(self, *args, **kwargs):
        launched.append(getattr(self.fn, "__name__", "?"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", spy)
    x, w1, w2, w, ids = make_case(3, 4, 2, 32, 16)
    out = fused_experts_triton(x, w1, w2, w, ids, config=small_cfg(routing="sorted"))
    assert launched.count("_moe_gemm_kernel") == 2 and "_moe_sum_kernel" in launched
    assert out.device.type == "cpu" and rel_err(out, naive.moe(x, w1, w2, w, ids)) < 5e-3


@pytest.mark.parametrize(
    "dtype,routing,activation",
    [
        (torch.float16, "slot", "silu"),
        (torch.float16, "sorted", "gelu"),
        (torch.float32, "sorted", "relu2"),
        (torch.float32, "slot", "swiglu"),
        (torch.bfloat16, "sorted", "silu"),
    ],
)
def test_standard_matches_reference(dtype, routing, activation):
    # K=48 and N=40 are not multiples of the 32-wide blocks: tails in K (masked) and N (wrapped).
    m, e, top_k, hidden, inter = 9, 6, 2, 48, 40
    x, w1, w2, w, ids = make_case(m, e, top_k, hidden, inter, activation, dtype, seed=1)
    x = x * 3  # push swiglu's clamp into play
    cfg = moe_config(e, top_k, hidden, inter, dtype, activation)
    weights = ExpertWeights(w1, w2)
    out = run_standard(TritonExperts(cfg, small_cfg(16, 32, 32, routing=routing)), cfg, x, weights, w, ids)
    tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    assert rel_err(out, reference(cfg, x, weights, w, ids)) < tol
    assert rel_err(out, naive.moe(x, w1, w2, w, ids, activation)) < tol


@pytest.mark.parametrize("routing", ["slot", "sorted"])
def test_expert_map_skips_remote_slots(routing):
    # 8 global experts, this rank owns global 2, 5 and 7 (local 0, 1, 2).
    m, e_global, top_k, hidden, inter = 7, 8, 3, 32, 24
    x, w1_all, w2_all, w, ids = make_case(m, e_global, top_k, hidden, inter, dtype=torch.float32, seed=2)
    owned = [2, 5, 7]
    expert_map = torch.full((e_global,), -1, dtype=torch.int32)
    expert_map[owned] = torch.arange(3, dtype=torch.int32)
    w1, w2 = w1_all[owned].contiguous(), w2_all[owned].contiguous()
    cfg = moe_config(e_global, top_k, hidden, inter, torch.float32)
    weights = ExpertWeights(w1, w2)
    out = fused_experts_triton(
        x, w1, w2, w, ids, expert_map=expert_map, global_num_experts=e_global, config=small_cfg(routing=routing)
    )
    ref = naive.moe(x, w1, w2, w, ids, expert_map=expert_map)
    assert rel_err(out, ref) < 1e-5
    torch_ref = reference(cfg, x, weights, w, ids, expert_map=expert_map, global_num_experts=e_global)
    assert rel_err(out, torch_ref) < 1e-5
    # Tokens with no local slot come out exactly zero.
    no_local = (expert_map.long()[ids.long()] < 0).all(dim=1)
    assert torch.equal(out[no_local], torch.zeros_like(out[no_local]))


def test_zero_tokens_and_single_expert():
    cfg = moe_config(1, 1, 32, 16, torch.float16)
    x, w1, w2, w, ids = make_case(0, 1, 1, 32, 16)
    out = run_standard(TritonExperts(cfg), cfg, x, ExpertWeights(w1, w2), w, ids)
    assert out.shape == (0, 32)
    x, w1, w2, w, ids = make_case(5, 1, 1, 32, 16, seed=4)
    out = run_standard(TritonExperts(cfg), cfg, x, ExpertWeights(w1, w2), w, ids)
    assert rel_err(out, naive.moe(x, w1, w2, w, ids)) < 3e-3


@pytest.mark.parametrize("routing", ["slot", "sorted"])
def test_non_contiguous_inputs_and_output(routing):
    m, e, top_k, hidden, inter = 6, 4, 2, 32, 16
    x, w1, w2, w, ids = make_case(m, e, top_k, hidden, inter, dtype=torch.float32, seed=5)
    wide = torch.zeros(m, 2 * hidden)
    wide[:, 1::2] = x
    x_strided = wide[:, 1::2]  # column stride 2
    assert x_strided.stride() == (2 * hidden, 2)
    out_buf = torch.full((hidden, m), float("nan"))
    out = out_buf.t()  # column-major output
    ids_t = ids.t().contiguous().t()
    res = fused_experts_triton(x_strided, w1, w2, w.t().contiguous().t(), ids_t, out=out, config=small_cfg(routing=routing))
    assert res.data_ptr() == out_buf.data_ptr()
    assert rel_err(out, naive.moe(x, w1, w2, w, ids)) < 1e-5


def test_split_k_persistent_grouped_raster_and_many_blocks():
    # 40 tokens top-2 over 3 experts: ~27 rows per expert, so two row blocks each, several column tiles,
    # split-K partials for GEMM2, a persistent grid smaller than the tile count and grouped raster.
    m, e, top_k, hidden, inter = 40, 3, 2, 80, 48
    x, w1, w2, w, ids = make_case(m, e, top_k, hidden, inter, dtype=torch.float32, seed=6)
    cfg = small_cfg(16, 16, 32, split_k=3, group_m=2, persistent=True, routing="sorted")
    out = fused_experts_triton(x, w1, w2, w, ids, config=cfg)
    assert rel_err(out, naive.moe(x, w1, w2, w, ids)) < 1e-5


@pytest.mark.parametrize("routing", ["slot", "sorted"])
def test_repeated_experts_overflow_one_block(routing):
    # 20 tokens that all pick expert 1 twice: 40 slots of one expert, more than BLOCK_M=16, so the slot
    # routing needs three leader programs for that expert.
    m, e, hidden, inter = 20, 3, 32, 16
    x, w1, w2, w, _ = make_case(m, e, 2, hidden, inter, dtype=torch.float32, seed=7)
    ids = torch.ones(m, 2, dtype=torch.int32)
    ids[::3, 1] = 2
    out = fused_experts_triton(x, w1, w2, w, ids, config=small_cfg(routing=routing))
    assert rel_err(out, naive.moe(x, w1, w2, w, ids)) < 1e-5


@pytest.mark.parametrize("routing", ["slot", "sorted"])
def test_dropped_slots_contribute_nothing(routing):
    # A prepare step may mark slots whose expert is elsewhere with id -1 (no expert_map needed).
    m, e, top_k, hidden, inter = 8, 4, 3, 32, 16
    x, w1, w2, w, ids = make_case(m, e, top_k, hidden, inter, dtype=torch.float32, seed=16)
    ids[::2, 1] = -1
    ids[3] = -1
    out = torch.full((m, hidden), float("nan"))
    fm.experts_standard(
        out, x, None, w1, w2, w, ids, activation="silu", quant=QuantConfig(), w1_scale=None, w2_scale=None,
        a2_scale=None, expert_map=None, global_num_experts=e, mul_routed_weight=True, config=small_cfg(routing=routing),
    )
    ref = naive.moe(x, w1, w2, w * (ids >= 0), ids.clamp(min=0))
    assert rel_err(out, ref) < 1e-5
    assert torch.equal(out[3], torch.zeros(hidden))


def fp8_case(m, e, top_k, hidden, inter, block, dtype=torch.float16, seed=0, activation="silu"):
    x, w1, w2, w, ids = make_case(m, e, top_k, hidden, inter, activation, dtype, seed)
    w1q, w1s = quantize_block_weight(w1, block)
    w2q, w2s = quantize_block_weight(w2, block)
    return x, w1q, w2q, w1s, w2s, w, ids


@pytest.mark.parametrize(
    "bn,scale_format,dtype",
    [
        (32, ScaleFormat.FP32, torch.float16),  # block_n == group: activation quantized in GEMM1's epilogue
        (16, ScaleFormat.FP32, torch.float32),  # narrower tile: GEMM2 quantizes its input on load
        (32, ScaleFormat.UE8M0, torch.bfloat16),
        (16, ScaleFormat.UE8M0, torch.float16),
    ],
)
def test_fp8_block_matches_reference(bn, scale_format, dtype):
    block = (32, 32)
    m, e, top_k, hidden, inter = 7, 4, 2, 64, 48  # inter=48: the last activation group is partial
    x, w1q, w2q, w1s, w2s, w, ids = fp8_case(m, e, top_k, hidden, inter, block, dtype, seed=8)
    quant = QuantConfig(QuantScheme.FP8_W8A8, block, scale_format=scale_format)
    cfg = moe_config(e, top_k, hidden, inter, dtype, quant=quant)
    weights = ExpertWeights(w1q, w2q, w1s, w2s)
    out = run_standard(TritonExperts(cfg, small_cfg(16, bn, 32)), cfg, x, weights, w, ids)
    ref = reference(cfg, x, weights, w, ids)
    assert rel_err(out, ref) < 2e-2
    if scale_format is ScaleFormat.FP32:
        # The independent loop quantizes exactly like the kernels (per token per 32 columns, fp32 scales).
        assert rel_err(out, naive.moe(x, w1q, w2q, w, ids, w1_scale=w1s, w2_scale=w2s, block=block)) < 2e-2


@pytest.mark.parametrize("bm,bn", [(16, 16), (16, 32), (64, 32)])
def test_fp8_block_functional_quantizes_inputs(bm, bn):
    # Model-dtype inputs with block scales: decode tiles (bm <= 32) quantize inside GEMM1's loads, larger
    # ones in a separate pass; both must equal per-token-group quantization of the inputs.
    block = (32, 32)
    m, e, top_k, hidden, inter = 9, 4, 2, 96, 64
    x, w1q, w2q, w1s, w2s, w, ids = fp8_case(m, e, top_k, hidden, inter, block, torch.float32, seed=17)
    out = fused_experts_triton(
        x, w1q, w2q, w, ids, w1_scale=w1s, w2_scale=w2s, quant=QuantConfig(QuantScheme.FP8_W8A8, block),
        config=small_cfg(bm, bn, 32, routing="sorted"),
    )
    ref = naive.moe(x, w1q, w2q, w, ids, w1_scale=w1s, w2_scale=w2s, block=block)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("per_act_token", [False, True])
def test_fp8_per_tensor_and_per_channel(per_act_token):
    m, e, top_k, hidden, inter = 6, 3, 2, 32, 16
    x, w1, w2, w, ids = make_case(m, e, top_k, hidden, inter, dtype=torch.float32, seed=9)
    if per_act_token:
        w1s = w1.abs().amax(dim=2, keepdim=True) / 448.0
        w2s = w2.abs().amax(dim=2, keepdim=True) / 448.0
    else:
        w1s = w1.abs().amax(dim=(1, 2)) / 448.0
        w2s = w2.abs().amax(dim=(1, 2)) / 448.0
    w1q = (w1 / w1s.reshape(e, -1, 1)).to(FP8)
    w2q = (w2 / w2s.reshape(e, -1, 1)).to(FP8)
    quant = QuantConfig(QuantScheme.FP8_W8A8, None, per_act_token=per_act_token)
    cfg = moe_config(e, top_k, hidden, inter, torch.float32, quant=quant)
    weights = ExpertWeights(w1q, w2q, w1s.contiguous(), w2s.contiguous())
    out = run_standard(TritonExperts(cfg, small_cfg()), cfg, x, weights, w, ids)
    assert rel_err(out, reference(cfg, x, weights, w, ids)) < 2e-2
    # And against the unquantized computation: FP8 error, not a wrong result.
    assert rel_err(out, naive.moe(x, w1, w2, w, ids)) < 0.1


@pytest.mark.parametrize("batched", [False, True])
def test_dynamic_per_tensor_fp8_reference_takes_one_scale_over_all_experts(batched):
    # The fused kernels quantize GEMM2's input with one scale over every routed row; the torch reference
    # must too (per-expert scales put it ~2e-3 away). Against a plain float64 loop written that way.
    m, e, top_k, hidden, inter = 7, 3, 2, 32, 16
    x, w1, w2, w, ids = make_case(m, e, top_k, hidden, inter, dtype=torch.float32, seed=23)
    w1s, w2s = w1.abs().amax(dim=(1, 2)) / 448.0, w2.abs().amax(dim=(1, 2)) / 448.0
    w1q, w2q = (w1 / w1s.reshape(e, 1, 1)).to(FP8), (w2 / w2s.reshape(e, 1, 1)).to(FP8)
    quant = QuantConfig(QuantScheme.FP8_W8A8, None)
    cfg = moe_config(e, top_k, hidden, inter, torch.float32, quant=quant)
    weights = ExpertWeights(w1q, w2q, w1s, w2s)
    with torch_ops():
        if batched:
            got = batched_run(BatchedTorchExperts, cfg, x, weights, w, ids)
        else:
            got = run_standard(TorchExperts(cfg), cfg, x, weights, w, ids)

    def fp8_round_trip(t, scale):
        return (t / scale).clamp(-448, 448).to(FP8).double() * scale

    xd = x.double()
    s1 = max(float(xd.abs().max()), 1e-10) / 448.0
    xq = fp8_round_trip(xd, s1)
    w1d, w2d = w1q.double() * w1s.double().reshape(e, 1, 1), w2q.double() * w2s.double().reshape(e, 1, 1)
    acts = {}
    for t in range(m):
        for j in range(top_k):
            ex = int(ids[t, j])
            h = xq[t] @ w1d[ex].t()
            acts[t, j] = torch.nn.functional.silu(h[:inter].float()).double() * h[inter:]
    s2 = max(float(torch.stack(list(acts.values())).abs().max()), 1e-10) / 448.0
    ref = torch.zeros(m, hidden, dtype=torch.float64)
    for (t, j), a in acts.items():
        ref[t] += float(w[t, j]) * (fp8_round_trip(a, s2) @ w2d[int(ids[t, j])].t())
    assert rel_err(got, ref) < 2e-4
    if not batched:
        tri = run_standard(TritonExperts(cfg, small_cfg()), cfg, x, weights, w, ids)
        assert rel_err(tri, got) < 2e-4


@pytest.mark.parametrize("layout", ["e_r", "e_1_r"])
def test_fp8_per_channel_scales_in_every_accepted_shape(layout):
    # [E, R, 1] is the canonical per-channel layout; [E, R] and [E, 1, R] hold the same values and must
    # give the same result (the rows run along whichever dimension is not 1).
    m, e, top_k, hidden, inter = 6, 3, 2, 32, 16
    x, w1, w2, w, ids = make_case(m, e, top_k, hidden, inter, dtype=torch.float32, seed=19)
    w1s = w1.abs().amax(dim=2, keepdim=True) / 448.0
    w2s = w2.abs().amax(dim=2, keepdim=True) / 448.0
    w1q, w2q = (w1 / w1s).to(FP8), (w2 / w2s).to(FP8)
    quant = QuantConfig(QuantScheme.FP8_W8A8, None, per_act_token=True)
    cfg = moe_config(e, top_k, hidden, inter, torch.float32, quant=quant)
    canonical = run_standard(TritonExperts(cfg, small_cfg()), cfg, x, ExpertWeights(w1q, w2q, w1s, w2s), w, ids)
    shaped = {"e_r": lambda s_: s_.reshape(e, -1), "e_1_r": lambda s_: s_.reshape(e, 1, -1)}[layout]
    other = run_standard(
        TritonExperts(cfg, small_cfg()), cfg, x, ExpertWeights(w1q, w2q, shaped(w1s), shaped(w2s)), w, ids
    )
    assert torch.isfinite(other).all() and torch.equal(other, canonical)
    with pytest.raises(ValueError, match="w1_scale must have shape"):
        run_standard(TritonExperts(cfg, small_cfg()), cfg, x,
                     ExpertWeights(w1q, w2q, w1s.reshape(e, 2, -1), w2s), w, ids)


def batched_run(experts_cls, cfg, x, weights, w, ids, expert_map=None, max_tokens=16, num_local=None):
    pf = BatchedLocalPrepareAndFinalize(cfg.quant, max_tokens, num_local or weights.num_local_experts)
    return ModularKernel(pf, experts_cls(cfg))(
        x, weights, w, ids, expert_map=expert_map, global_num_experts=cfg.num_experts
    )


@pytest.mark.parametrize("quantized", [False, True])
def test_batched_matches_batched_reference(quantized):
    m, e, top_k, hidden, inter = 10, 4, 2, 64, 48
    dtype = torch.float16
    if quantized:
        block = (32, 32)
        x, w1q, w2q, w1s, w2s, w, ids = fp8_case(m, e, top_k, hidden, inter, block, dtype, seed=10)
        quant = QuantConfig(QuantScheme.FP8_W8A8, block)
        weights = ExpertWeights(w1q, w2q, w1s, w2s)
    else:
        x, w1, w2, w, ids = make_case(m, e, top_k, hidden, inter, dtype=dtype, seed=10)
        quant = QuantConfig()
        weights = ExpertWeights(w1, w2)
    cfg = moe_config(e, top_k, hidden, inter, dtype, quant=quant, max_num_tokens=16)
    out = batched_run(BatchedTritonExperts, cfg, x, weights, w, ids)
    with torch_ops():
        ref = batched_run(BatchedTorchExperts, cfg, x, weights, w, ids)
    assert rel_err(out, ref) < (2e-2 if quantized else 3e-3)
    if not quantized:
        assert rel_err(out, naive.moe(x, weights.w1, weights.w2, w, ids)) < 3e-3


def test_batched_masked_rows_and_expert_map():
    # Experts with zero tokens, a partially filled block and an expert map (global 6 -> local 2).
    m, e_global, top_k, hidden, inter = 5, 6, 2, 32, 16
    x, w1_all, w2_all, w, ids = make_case(m, e_global, top_k, hidden, inter, dtype=torch.float32, seed=11)
    expert_map = torch.tensor([-1, 0, -1, -1, 1, -1], dtype=torch.int32)
    w1, w2 = w1_all[[1, 4]].contiguous(), w2_all[[1, 4]].contiguous()
    cfg = moe_config(e_global, top_k, hidden, inter, torch.float32, max_num_tokens=8)
    weights = ExpertWeights(w1, w2)
    out = batched_run(BatchedTritonExperts, cfg, x, weights, w, ids, expert_map=expert_map, max_tokens=8)
    assert rel_err(out, naive.moe(x, w1, w2, w, ids, expert_map=expert_map)) < 1e-5


def test_batched_leaves_rows_past_counts_unwritten():
    e, t, hidden, inter = 3, 20, 32, 16
    g = torch.Generator().manual_seed(12)
    a = torch.randn(e, t, hidden, generator=g)
    w1 = torch.randn(e, 2 * inter, hidden, generator=g) * hidden**-0.5
    w2 = torch.randn(e, hidden, inter, generator=g) * inter**-0.5
    counts = torch.tensor([0, 17, 4], dtype=torch.int32)
    out = torch.full((e, t, hidden), float("nan"))
    fm.experts_batched(
        out, a, None, w1, w2, counts, activation="silu", quant=QuantConfig(), w1_scale=None, w2_scale=None,
        a2_scale=None, config=small_cfg(),
    )
    for ex in range(e):
        n = int(counts[ex])
        if n:
            h = a[ex, :n].double() @ w1[ex].double().t()
            ref = (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]) @ w2[ex].double().t()
            assert rel_err(out[ex, :n], ref) < 1e-5
        assert torch.isnan(out[ex, n:]).all()


@pytest.mark.parametrize("routing", ["slot", "sorted"])
def test_valid_tokens_on_device(routing):
    # One set of buffers for 12 tokens; only the first 5 count. The rest of `out` must stay untouched.
    m, e, top_k, hidden, inter = 12, 5, 2, 32, 16
    x, w1, w2, w, ids = make_case(m, e, top_k, hidden, inter, dtype=torch.float32, seed=13)
    # int64 counts past 2**31 clamp to every token (2**32 + 5 would wrap to 5 if cast to int32 first)
    for v, dtype in ((5, torch.int32), (0, torch.int32), (12, torch.int32), (2**32 + 5, torch.int64)):
        out = torch.full((m, hidden), float("nan"))
        fused_experts_triton(
            x, w1, w2, w, ids, out=out, valid_tokens=torch.tensor([v], dtype=dtype), num_tokens_hint=4,
            config=small_cfg(routing=routing),
        )
        v = min(v, m)
        if v:
            assert rel_err(out[:v], naive.moe(x[:v], w1, w2, w[:v], ids[:v])) < 1e-5
        assert torch.isnan(out[v:]).all()


def test_input_validation():
    x, w1, w2, w, ids = make_case(4, 3, 2, 32, 16, dtype=torch.float32)
    with pytest.raises(TypeError, match="config must be an ops.launch_config.LaunchConfig"):
        fused_experts_triton(x, w1, w2, w, ids, config=[16, 16, 16])
    as_dict = fused_experts_triton(x, w1, w2, w, ids, config=small_cfg().to_dict())
    assert rel_err(as_dict, naive.moe(x, w1, w2, w, ids)) < 1e-5
    w1q, s1 = quantize_block_weight(w1.float(), (24, 24))
    w2q, s2 = quantize_block_weight(w2.float(), (24, 24))
    with pytest.raises(ValueError, match=r"quant.block_shape \(24, 24\): the Triton kernels need"):
        fused_experts_triton(x, w1q, w2q, w, ids, w1_scale=s1, w2_scale=s2,
                             quant=QuantConfig(QuantScheme.FP8_W8A8, (24, 24)))
    with pytest.raises(TypeError, match="topk_ids"):
        fused_experts_triton(x, w1, w2, w, ids.float())
    with pytest.raises(ValueError, match="valid_tokens"):
        fused_experts_triton(x, w1, w2, w, ids, valid_tokens=3)
    with pytest.raises(ValueError, match="out must be"):
        fused_experts_triton(x, w1, w2, w, ids, out=torch.empty(4, 16))
    with pytest.raises(ValueError, match="num_tokens_hint"):
        fused_experts_triton(x, w1, w2, w, ids, num_tokens_hint=0)
    with pytest.raises(ValueError, match="topk_ids values"):
        fused_experts_triton(x, w1, w2, w, ids + 5)


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    x, w1, w2, w, ids = make_case(2, 3, 2, 32, 16, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fused_experts_triton(x, w1, w2, w, ids)


def caps(device_type="cpu", capability=None, triton_status=""):
    return Capabilities(device_type, capability, "test", {"triton": triton_status})


def test_supports_reasons(monkeypatch):
    bf16 = moe_config(8, 2, 64, 32, torch.bfloat16)
    fp8 = moe_config(8, 2, 256, 128, torch.bfloat16, quant=QuantConfig.fp8_block())
    for cls in (TritonExperts, BatchedTritonExperts):
        assert cls.required_modules == ("triton",)
        assert cls.supports(bf16, caps()) == (True, "")
        assert cls.supports(bf16, caps("cuda", (9, 0))) == (True, "")
        assert cls.supports(fp8, caps("cuda", (9, 0))) == (True, "")
        ok, reason = cls.supports(fp8, caps("cuda", (8, 0)))
        assert not ok and "8.9" in reason
        ok, reason = cls.supports(bf16, caps("cuda", (7, 5)))
        assert not ok and "8.0" in reason
        ok, reason = cls.supports(bf16, caps(triton_status="ImportError: no triton"))
        assert not ok and "triton" in reason
        odd = moe_config(8, 2, 64, 32, torch.bfloat16, quant=QuantConfig(QuantScheme.FP8_W8A8, (128, 96)))
        ok, reason = cls.supports(odd, caps("cuda", (9, 0)))
        assert not ok and "power of two" in reason
    monkeypatch.delenv("TRITON_INTERPRET")
    ok, reason = TritonExperts.supports(bf16, caps())
    assert not ok and reason == "CPU without TRITON_INTERPRET=1: torch reference is faster"


def test_oracle_picks_triton_under_interpreter(monkeypatch):
    from moe_plugin.oracle import select

    cfg = moe_config(8, 2, 64, 32, torch.float16)
    sel = select(cfg, "cpu")
    assert sel.experts is TritonExperts
    monkeypatch.delenv("TRITON_INTERPRET")
    sel = select(cfg, "cpu")
    assert sel.experts is TorchExperts
    assert "TRITON_INTERPRET" in sel.explain()


def test_workspace_shapes_cover_fp8_intermediate():
    quant = QuantConfig.fp8_block()
    cfg = moe_config(8, 2, 256, 384, torch.bfloat16, quant=quant)
    shapes = TritonExperts(cfg).workspace_shapes(7, 768, 256, 2, 8, 8, None, "silu")
    assert shapes.output == (7, 256) and shapes.workspace13 == (14, 256)
    have = shapes.workspace2[0] * 2  # bf16 bytes
    assert have >= fm.intermediate_bytes(14, 384, torch.bfloat16, quant, fused_quant=True)
    assert have >= fm.intermediate_bytes(14, 384, torch.bfloat16, quant, fused_quant=False)


@pytest.mark.parametrize("quant", [QuantConfig(), QuantConfig(QuantScheme.FP8_W8A8, (32, 32))])
def test_declared_workspaces_are_used(quant):
    # The framework owns the scratch buffers (CUDA-graph safety): the kernels must write into them, not
    # into private allocations.
    m, e, top_k, hidden, inter = 6, 4, 2, 64, 64
    if quant.is_quantized:
        x, w1, w2, w1s, w2s, w, ids = fp8_case(m, e, top_k, hidden, inter, (32, 32), torch.float16, seed=18)
    else:
        x, w1, w2, w, ids = make_case(m, e, top_k, hidden, inter, dtype=torch.float16, seed=18)
        w1s = w2s = None
    cfg = moe_config(e, top_k, hidden, inter, torch.float16, quant=quant)
    experts = TritonExperts(cfg, small_cfg(16, 32, 32))
    shapes = experts.workspace_shapes(m, 2 * inter, hidden, top_k, e, e, None, "silu")
    ws13 = torch.full(shapes.workspace13, float("nan"), dtype=torch.float16)
    ws2 = torch.full(shapes.workspace2, float("nan"), dtype=torch.float16)
    if quant.is_quantized:
        ws2.view(torch.uint8).fill_(0x7F)
    out = torch.empty(shapes.output, dtype=torch.float16)
    a1q, a1s = (x, None)
    if quant.is_quantized:
        from moe_plugin.ops.quant import per_token_group_quant_fp8

        a1q, a1s = per_token_group_quant_fp8(x, 32)
    experts.apply(
        out, a1q, ExpertWeights(w1, w2, w1s, w2s), w, ids, activation="silu", global_num_experts=e,
        expert_map=None, a1q_scale=a1s, workspace13=ws13, workspace2=ws2, expert_tokens_meta=None,
        apply_router_weight_on_input=False,
    )
    assert not torch.isnan(ws13).any()  # every slot's GEMM2 row landed in workspace13
    if quant.is_quantized:
        # FP8 activation bytes at the start of workspace2; 0x7F (e4m3 NaN) is never a quantized value.
        assert not (ws2.view(torch.uint8)[: m * top_k * inter] == 0x7F).any()
    else:
        assert not torch.isnan(ws2[: m * top_k * inter]).any()
    ref = naive.moe(x, w1, w2, w, ids, w1_scale=w1s, w2_scale=w2s, block=(32, 32) if quant.is_quantized else None)
    assert rel_err(out, ref) < (2e-2 if quant.is_quantized else 3e-3)


def test_heuristic_regimes():
    decode = fm.heuristic_config(1, 128, 128, 768, 2048, 8, fp8=False, num_sms=132)
    assert decode.routing == "slot" and decode.gemm1.block_m == 16
    # Memory-bound: enough column tiles for every SM (8 experts x 768 / block_n >= 2 * 132).
    assert 8 * (768 // decode.gemm1.block_n) >= 264
    prefill = fm.heuristic_config(16384, 8, 8, 14336, 4096, 2, fp8=False, num_sms=132)
    assert prefill.routing == "sorted" and prefill.gemm1.block_m == 128 and prefill.gemm1.num_warps == 8
    fp8_prefill = fm.heuristic_config(16384, 32, 256, 2048, 7168, 8, fp8=True, num_sms=132, group_k=128)
    assert fp8_prefill.gemm1.block_k <= 128 and fp8_prefill.gemm1.block_n % 128 == 0  # fused requant
    # 32 rows per expert: FP8 takes 64-row tiles (a separate input quantization), bf16 keeps 32
    fp8_mid = fm.heuristic_config(1024, 32, 256, 2048, 7168, 8, fp8=True, num_sms=132, group_k=128)
    assert fp8_mid.gemm1.block_m == 64
    assert fm.heuristic_config(1024, 32, 256, 2048, 7168, 8, fp8=False, num_sms=132).gemm1.block_m == 32
    # per-tensor FP8 (no block group) never quantizes on load: it keeps the 32-row tiles
    assert fm.heuristic_config(1024, 32, 256, 2048, 7168, 8, fp8=True, num_sms=132).gemm1.block_m == 32


def test_config_file_lookup(tmp_path, monkeypatch):
    name = fm.config_file_name(8, 40, "cpu", "fp32")
    assert name == "E=8,N=40,device_name=cpu,dtype=fp32.json"
    assert fm.config_file_name(8, 40, "cpu", "fp32", batched=True) == "E=8,N=40,device_name=cpu,dtype=fp32,layout=batched.json"
    assert fm.config_file_name(32, 2048, "NVIDIA H100 80GB HBM3", "fp8_w8a8", (128, 128)) == (
        "E=32,N=2048,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8,block_shape=[128,128].json"
    )
    table = {
        "_meta": {"note": "ignored"},
        "1": small_cfg(16, 16, 16, routing="slot").to_dict(),
        "64": small_cfg(32, 32, 16, routing="sorted", split_k=2).to_dict(),
    }
    (tmp_path / name).write_text(json.dumps(table))
    monkeypatch.setenv(fm.CONFIG_DIR_ENV, str(tmp_path))
    kw = dict(num_local=8, num_global=8, n=40, k=32, top_k=2, dtype=torch.float32, quant=QuantConfig(), device="cpu")
    near_small = fm.get_launch_config(2, **kw)
    assert near_small.gemm1.block_m == 16 and near_small.routing == "slot" and near_small.source.endswith("[1]")
    near_big = fm.get_launch_config(50, **kw)
    assert near_big.gemm1.block_m == 32 and near_big.gemm2.split_k == 2 and near_big.source.endswith("[64]")
    # No entry within a factor of two: the heuristic, not a config tuned for another regime.
    assert fm.get_launch_config(16, **kw).source == "heuristic"
    assert fm.get_launch_config(1024, **kw).source == "heuristic"
    # The chosen file config runs.
    x, w1, w2, w, ids = make_case(50, 8, 2, 32, 20, dtype=torch.float32, seed=14)
    assert rel_err(fused_experts_triton(x, w1, w2, w, ids), naive.moe(x, w1, w2, w, ids)) < 1e-5
    monkeypatch.setenv(fm.FORCE_CONFIG_ENV, json.dumps(small_cfg(16, 16, 16, routing="sorted").to_dict()))
    assert fm.get_launch_config(50, **kw).source == fm.FORCE_CONFIG_ENV


def test_launch_config_rejects_bad_entries():
    with pytest.raises(ValueError, match="unknown launch config keys"):
        LaunchConfig.from_dict({"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 16, "bogus": 1})
    with pytest.raises(ValueError, match="share"):
        LaunchConfig.from_dict(
            {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 16, "gemm2": {"BLOCK_SIZE_M": 32}}
        )
    with pytest.raises(ValueError, match="power of two"):
        GemmLaunch(24, 16, 16)
    with pytest.raises(ValueError, match="split_k"):
        LaunchConfig(GemmLaunch(16, 16, 16, split_k=2), GemmLaunch(16, 16, 16))
    round_trip = LaunchConfig.from_dict(small_cfg(32, 64, 16, bn2=128, split_k=4).to_dict())
    assert round_trip == small_cfg(32, 64, 16, bn2=128, split_k=4)


@pytest.mark.parametrize(
    "content,needle",
    [
        ("{not json", "is not valid JSON"),
        ('{"four": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 16}}', "key 'four' is not a token count"),
        ('{"8": {"BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 16}}', r"\[8\]: launch config needs BLOCK_SIZE_M"),
        ('{"8": {"BLOCK_SIZE_M": 16.7, "BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 16}}', "BLOCK_SIZE_M must be an int, got 16.7"),
        ('{"8": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 16, "gemm2": null}}', "gemm2 must be a dict"),
        ('{"8": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 16, "gemm2": {"BLOCK_N": 32}}}',
         r"unknown gemm2 keys \['BLOCK_N'\]"),
        ('{"8": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 16, "persistent": "false"}}',
         "persistent must be true or false"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_config_file_names_the_file_and_entry(tmp_path, monkeypatch, content, needle):
    name = fm.config_file_name(8, 40, "cpu", "fp32")
    (tmp_path / name).write_text(content)
    monkeypatch.setenv(fm.CONFIG_DIR_ENV, str(tmp_path))
    kw = dict(num_local=8, num_global=8, n=40, k=32, top_k=2, dtype=torch.float32, quant=QuantConfig(), device="cpu")
    with pytest.raises(ValueError, match=needle) as info:
        fm.get_launch_config(8, **kw)
    assert name in str(info.value)


def test_every_shipped_config_file_parses():
    # The stricter parser must accept what tune.py wrote (ints, booleans, known keys).
    paths = sorted(fm.CONFIG_DIR.glob("*.json"))
    assert paths
    for path in paths:
        table = launch_config._load_config_file(str(path), path.stat().st_mtime)
        assert table and all(isinstance(c, LaunchConfig) for c in table.values()), path.name


def test_ep_config_runs_with_expert_map_through_modular_kernel():
    # The same EP shard through ModularKernel (expert_map, global ids) against the torch experts.
    m, e_global, top_k, hidden, inter = 9, 16, 4, 32, 16
    x, w1_all, w2_all, w, ids = make_case(m, e_global, top_k, hidden, inter, dtype=torch.float16, seed=15)
    owned = list(range(4, 8))
    expert_map = torch.full((e_global,), -1, dtype=torch.int32)
    expert_map[owned] = torch.arange(4, dtype=torch.int32)
    w1, w2 = w1_all[owned].contiguous(), w2_all[owned].contiguous()
    cfg = moe_config(e_global, top_k, hidden, inter, torch.float16, parallel=ParallelConfig())
    weights = ExpertWeights(w1, w2)
    kw = dict(expert_map=expert_map, global_num_experts=e_global)
    out = run_standard(TritonExperts(cfg, small_cfg(routing="sorted")), cfg, x, weights, w, ids, **kw)
    assert rel_err(out, reference(cfg, x, weights, w, ids, **kw)) < 3e-3


def test_cpu_call_without_the_interpreter_is_refused_by_name(monkeypatch):
    # Built directly (the oracle would not pick it on CPU): a clear error, not Triton's "0 active drivers".
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = MoEConfig(4, 2, 32, 16, dtype=torch.float32)
    kern = ModularKernel(LocalPrepareAndFinalize.from_config(cfg), TritonExperts(cfg))
    x, tw = torch.randn(5, 32), torch.rand(5, 2)
    ids = torch.randint(0, 4, (5, 2), dtype=torch.int32)
    with pytest.raises(RuntimeError, match="on CPU under TRITON_INTERPRET=1; got a cpu tensor"):
        kern(x, ExpertWeights(torch.randn(4, 32, 32), torch.randn(4, 32, 16)), tw, ids)
