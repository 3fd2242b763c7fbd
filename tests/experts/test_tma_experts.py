"""The TMA-fed path of the Triton experts (``ops.tma_gemm``, ``LaunchConfig.tma``) under the interpreter,
against the float64 loops of tests/naive.py: both activation-source modes, tails in K and N, expert
parallelism, device-side valid counts, the declared workspaces, and the fallbacks to the pointer kernel.
"""

from __future__ import annotations

import pytest
import torch

import naive
from moe_plugin import ExpertWeights, MoEConfig
from moe_plugin.experts.triton import TritonExperts
from moe_plugin.ops import fused_moe as fm
from moe_plugin.ops.fused_moe import GemmLaunch, LaunchConfig, fused_experts_triton
from moe_plugin.ops.tma_gemm import tma_problem


# tma="all" leaves the padding rows of its sorted token copy unwritten (their results are never read);
# numpy warns when the interpreter computes on that garbage.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(fm.FORCE_CONFIG_ENV, raising=False)
    monkeypatch.delenv(fm.CONFIG_DIR_ENV, raising=False)


@pytest.fixture
def launched(monkeypatch):
    """Names of the kernels each call launches (a call-through spy on the interpreter's launcher)."""
    from triton.runtime.interpreter import InterpretedFunction

    names: list[str] = []
    original = InterpretedFunction.run

    def spy(self, *args, **kwargs):
        names.append(getattr(self.fn, "__name__", "?"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", spy)
    return names


def rel_err(out, ref):
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def tma_cfg(tma, bm=16, bn=32, bk=32, persistent=False):
    return LaunchConfig(GemmLaunch(bm, bn, bk, group_m=2), GemmLaunch(bm, bn, bk, group_m=2), routing="sorted",
                        persistent=persistent, tma=tma)


def make_case(m, e, top_k, hidden, inter, activation="silu", dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = inter if activation == "relu2" else 2 * inter
    x = torch.randn(m, hidden, generator=g).to(dtype)
    w1 = (torch.randn(e, rows, hidden, generator=g) * hidden**-0.5).to(dtype)
    w2 = (torch.randn(e, hidden, inter, generator=g) * inter**-0.5).to(dtype)
    ids = torch.stack([torch.randperm(e, generator=g)[:top_k] for _ in range(m)]).to(torch.int32)
    weights = torch.rand(m, top_k, generator=g)
    return x, w1, w2, weights, ids


TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}


@pytest.mark.parametrize(
    "tma,dtype,activation,persistent",
    [
        ("weights", torch.bfloat16, "silu", False),
        ("weights", torch.float16, "relu2", True),
        ("all", torch.bfloat16, "swiglu", False),
        ("all", torch.float16, "gelu", True),
    ],
)
def test_tma_path_matches_naive(launched, tma, dtype, activation, persistent):
    # K=48 and N=40 are not multiples of the 32-wide tiles: descriptor loads past the ends read zeros and
    # the columns past N are not stored.
    x, w1, w2, w, ids = make_case(9, 6, 2, 48, 40, activation, dtype, seed=1)
    x = x * 3  # push swiglu's clamp into play
    out = fused_experts_triton(x, w1, w2, w, ids, activation=activation, config=tma_cfg(tma, persistent=persistent))
    assert launched.count("_moe_gemm_tma_kernel") == 2 and "_moe_gemm_kernel" not in launched
    assert ("_scatter_rows_kernel" in launched) == (tma == "all")
    assert rel_err(out, naive.moe(x, w1, w2, w, ids, activation)) < TOL[dtype]


@pytest.mark.parametrize("tma", ["weights", "all"])
def test_tma_expert_map_and_weight_on_input(tma):
    # 8 global experts, this rank owns global 1, 4, 6; routing weights applied to the input instead.
    x, w1, w2, w, ids = make_case(11, 8, 3, 32, 24, dtype=torch.float16, seed=2)
    owned = [1, 4, 6]
    emap = torch.full((8,), -1, dtype=torch.int32)
    emap[owned] = torch.arange(3, dtype=torch.int32)
    local_w1, local_w2 = w1[owned].contiguous(), w2[owned].contiguous()
    out = fused_experts_triton(x, local_w1, local_w2, w, ids, expert_map=emap, global_num_experts=8,
                               config=tma_cfg(tma))
    assert rel_err(out, naive.moe(x, local_w1, local_w2, w, ids, expert_map=emap)) < 3e-3
    # top-1 with the weight applied to the input: GEMM2 must not multiply again
    ids1 = ids[:, :1].contiguous()
    w_in = w[:, :1].contiguous()
    out = fused_experts_triton(x, local_w1, local_w2, w_in, ids1, expert_map=emap, global_num_experts=8,
                               config=tma_cfg(tma), apply_router_weight_on_input=True)
    ref = naive.moe(x, local_w1, local_w2, w_in, ids1, expert_map=emap, apply_router_weight_on_input=True)
    assert rel_err(out, ref) < 3e-3


@pytest.mark.parametrize("tma", ["weights", "all"])
def test_tma_valid_tokens_on_device(tma):
    # Buffers for 12 tokens, 5 valid: rows past the count are neither computed nor written.
    x, w1, w2, w, ids = make_case(12, 5, 2, 32, 16, dtype=torch.float16, seed=3)
    for v in (5, 0, 12):
        out = torch.full_like(x, float("nan"))
        fused_experts_triton(x, w1, w2, w, ids, out=out, valid_tokens=torch.tensor([v]), num_tokens_hint=4,
                             config=tma_cfg(tma))
        if v:
            assert rel_err(out[:v], naive.moe(x[:v], w1, w2, w[:v], ids[:v])) < 3e-3
        assert torch.isnan(out[v:]).all()


def test_tma_needs_unquantized_row_major_16_byte_rows(launched):
    x, w1, w2, w, ids = make_case(6, 4, 2, 32, 16, dtype=torch.float16, seed=4)
    assert tma_problem(x, w1, w2, quantized=False) is None
    assert "quantized" in tma_problem(x, w1, w2, quantized=True)
    assert "bf16 or fp16" in tma_problem(x.float(), w1.float(), w2.float(), quantized=False)
    # (the experts refuse non-contiguous weights anyway; the check guards check_inputs=False callers)
    w1_t = w1.transpose(1, 2).contiguous().transpose(1, 2)
    assert "row-major" in tma_problem(x, w1_t, w2, quantized=False)
    # 12 fp16 columns are 24-byte rows: no descriptor.
    x12, w1_12, w2_12, w12, ids12 = make_case(6, 4, 2, 12, 16, dtype=torch.float16, seed=5)
    assert "16-byte" in tma_problem(x12, w1_12, w2_12, quantized=False)
    # Each of these runs on the pointer kernel, correctly.
    for args in ((x.float(), w1.float(), w2.float(), w, ids), (x12, w1_12, w2_12, w12, ids12)):
        launched.clear()
        out = fused_experts_triton(*args, config=tma_cfg("weights"))
        assert "_moe_gemm_tma_kernel" not in launched and launched.count("_moe_gemm_kernel") == 2
        assert rel_err(out, naive.moe(*args)) < 3e-3


def run_in_declared_workspaces(experts, x, w1, w2, w, ids, monkeypatch):
    """``experts.apply`` in NaN-filled buffers of ``workspace_shapes``' sizes: (out, shapes, workspace13,
    whether any of the pipeline's buffer requests fell back to a fresh allocation)."""
    m, hidden = x.shape
    e, top_k, inter = w1.shape[0], ids.shape[1], w2.shape[2]
    shapes = experts.workspace_shapes(m, w1.shape[1], hidden, top_k, e, e, None, "silu")
    ws13 = torch.full(shapes.workspace13, float("nan"), dtype=x.dtype)
    ws2 = torch.full(shapes.workspace2, float("nan"), dtype=x.dtype)
    fresh = []
    original = fm._bytes_view

    def spy(buf, nbytes, device):
        view = original(buf, nbytes, device)
        fresh.append(buf is None or view.data_ptr() != buf.data_ptr())
        return view

    monkeypatch.setattr(fm, "_bytes_view", spy)
    out = torch.empty(shapes.output, dtype=x.dtype)
    experts.apply(
        out, x, ExpertWeights(w1, w2), w, ids, activation="silu", global_num_experts=e, expert_map=None,
        a1q_scale=None, workspace13=ws13, workspace2=ws2, expert_tokens_meta=None,
        apply_router_weight_on_input=False,
    )
    monkeypatch.setattr(fm, "_bytes_view", original)
    assert fresh, "the pipeline asked for no buffer"
    return out, shapes, ws13, any(fresh)


def test_tma_uses_the_declared_workspaces(monkeypatch):
    # TritonExperts declares the sorted buffers its launch config needs (the token copy for "all" only), and
    # the TMA path must run in them (no allocation of its own).
    m, e, top_k, hidden, inter = 32, 2, 2, 32, 16
    x, w1, w2, w, ids = make_case(m, e, top_k, hidden, inter, dtype=torch.float16, seed=6)
    cfg = MoEConfig(e, top_k, hidden, inter, dtype=torch.float16)
    for tma in ("weights", "all"):
        out, shapes, ws13, allocated = run_in_declared_workspaces(TritonExperts(cfg, tma_cfg(tma)), x, w1, w2, w, ids, monkeypatch)
        assert shapes.workspace2[0] >= fm.tma_workspace_rows(m * top_k, e, 16) * inter
        extra13 = shapes.workspace13[0] - m * top_k
        assert (extra13 >= fm.tma_workspace_rows(m * top_k, e, 16)) == (tma == "all")
        assert not allocated
        assert not torch.isnan(ws13[: m * top_k]).any()  # every slot's GEMM2 row
        assert rel_err(out, naive.moe(x, w1, w2, w, ids)) < 3e-3


def test_launch_config_tma_key():
    d = tma_cfg("all").to_dict()
    assert d["tma"] == "all"
    assert LaunchConfig.from_dict(d).tma == "all"
    d.pop("tma")
    assert LaunchConfig.from_dict(d).tma == "off"
    with pytest.raises(ValueError, match="tma"):
        LaunchConfig.from_dict({**d, "tma": "yes"})
    with pytest.raises(ValueError, match="sorted routing"):
        LaunchConfig(GemmLaunch(16, 32, 32), GemmLaunch(16, 32, 32), routing="slot", tma="weights")
    with pytest.raises(ValueError, match="split-K"):
        LaunchConfig(GemmLaunch(16, 32, 32), GemmLaunch(16, 32, 32, split_k=2), tma="weights")


def test_heuristic_takes_tma_only_for_large_unquantized_tiles():
    big = fm.heuristic_config(4096, 8, 8, 14336, 4096, 2, fp8=False, num_sms=132, tma=True)
    assert big.tma == "weights" and big.gemm1.block_m == 128
    assert fm.heuristic_config(4096, 8, 8, 14336, 4096, 2, fp8=False, num_sms=132).tma == "off"
    assert fm.heuristic_config(16, 8, 8, 14336, 4096, 2, fp8=False, num_sms=132, tma=True).tma == "off"
    assert fm.heuristic_config(4096, 8, 8, 14336, 4096, 2, fp8=True, num_sms=132, group_k=128, tma=True).tma == "off"
    # CPU (no capability): the interpreter never picks it by itself
    cpu = fm.get_launch_config(4096, num_local=8, num_global=8, n=256, k=128, top_k=2, dtype=torch.bfloat16,
                               quant=fm.QuantConfig(), device="cpu")
    assert cpu.tma == "off"


def test_workspaces_do_not_grow_without_the_tma_path():
    m, e, top_k, hidden, inter = 32, 2, 2, 32, 16
    plain = (m * top_k, hidden), (m * top_k * inter + 512,)
    for dtype, launch in ((torch.float16, tma_cfg("off")), (torch.float32, tma_cfg("all")), (torch.float16, None)):
        cfg = MoEConfig(e, top_k, hidden, inter, dtype=dtype)
        shapes = TritonExperts(cfg, launch).workspace_shapes(m, 2 * inter, hidden, top_k, e, e, None, "silu")
        assert (shapes.workspace13, shapes.workspace2) == plain, (dtype, launch)


def test_all_mode_gathers_tokens_with_strided_columns(launched):
    # The token-major scatter reads each row as one run: column-strided tokens must take the gather mode.
    x, w1, w2, w, ids = make_case(6, 4, 2, 32, 16, dtype=torch.float16, seed=7)
    x_strided = x.t().contiguous().t()
    assert x_strided.stride(1) != 1
    out = fused_experts_triton(x_strided, w1, w2, w, ids, config=tma_cfg("all"))
    assert launched.count("_moe_gemm_tma_kernel") == 2 and "_scatter_rows_kernel" not in launched
    assert rel_err(out, naive.moe(x, w1, w2, w, ids)) < 3e-3


def test_padded_weight_rows_that_break_tma_alignment_fall_back(launched):
    # K=12 fp16 rows stored 16 apart: w1's own stride is aligned but K is not (the sorted token copy and
    # the descriptors' extents would be 24-byte rows).
    x, w1, w2, w, ids = make_case(6, 4, 2, 12, 16, dtype=torch.float16, seed=8)
    padded = torch.zeros(4, 32, 16, dtype=torch.float16)
    padded[..., :12] = w1
    w1_padded = padded[..., :12]
    assert "16-byte" in tma_problem(x, w1_padded, w2, quantized=False)
    out = fused_experts_triton(x, w1_padded, w2, w, ids, config=tma_cfg("all"), check_inputs=False)
    assert "_moe_gemm_tma_kernel" not in launched
    assert rel_err(out, naive.moe(x, w1, w2, w, ids)) < 3e-3


def test_tuned_file_tma_entry_plans_the_workspaces_apply_uses(tmp_path, monkeypatch):
    # No pinned config: workspace_shapes and apply must resolve the same tuned entry (here a tma="all"
    # one for this CPU "device"), so the TMA path runs in the declared buffers.
    import json

    m, e, top_k, hidden, inter = 24, 3, 2, 32, 16
    x, w1, w2, w, ids = make_case(m, e, top_k, hidden, inter, dtype=torch.float16, seed=9)
    name = fm.config_file_name(e, inter, "cpu", "fp16")
    entry = tma_cfg("all").to_dict()
    (tmp_path / name).write_text(json.dumps({str(m): entry}))
    monkeypatch.setenv(fm.CONFIG_DIR_ENV, str(tmp_path))
    experts = TritonExperts(MoEConfig(e, top_k, hidden, inter, dtype=torch.float16))
    out, shapes, _, allocated = run_in_declared_workspaces(experts, x, w1, w2, w, ids, monkeypatch)
    assert shapes.workspace13[0] >= m * top_k + fm.tma_workspace_rows(m * top_k, e, 16)
    assert not allocated
    assert rel_err(out, naive.moe(x, w1, w2, w, ids)) < 3e-3
