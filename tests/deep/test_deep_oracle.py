"""The oracle with DeepGEMM / DeepEP facts injected: what it picks on a Hopper / Blackwell box with the
libraries present, and the one reason it gives for each rejection."""

import pytest
import torch

from moe_plugin import MoEConfig, ParallelConfig, QuantConfig
from moe_plugin.experts import deep_gemm as dg
from moe_plugin.oracle import BackendUnavailableError, Capabilities, select

FP8 = QuantConfig.fp8_block()


def caps(capability=(9, 0), deep_gemm=True, deep_ep=True, device="cuda"):
    modules = {
        "triton": "",
        "deep_gemm": "" if deep_gemm else "ModuleNotFoundError: No module named 'deep_gemm'",
        "deep_ep": "" if deep_ep else "ModuleNotFoundError: No module named 'deep_ep'",
    }
    return Capabilities(device, capability if device == "cuda" else None, "NVIDIA H100" if device == "cuda" else device, modules)


def verdict(selection, name):
    for v in selection.experts_verdicts + selection.prepare_finalize_verdicts:
        if v.name == name:
            return v.reason
    raise KeyError(name)


def qwen(**kw):
    kw.setdefault("quant", FP8)
    return MoEConfig(128, 8, 2048, 768, **kw)


def test_deep_gemm_chosen_on_hopper_with_fp8_blocks():
    sel = select(qwen(max_num_tokens=4096), caps=caps())
    assert sel.experts.name == "deep_gemm" and sel.prepare_finalize.name == "local"
    assert "deep_gemm" in sel.explain() and verdict(sel, "deep_gemm") == "chosen"


@pytest.mark.parametrize(
    "config,capabilities,needle",
    [
        (qwen(), caps(capability=(8, 0)), "needs SM90 (Hopper) or SM100 (Blackwell), device is sm80"),
        (qwen(), caps(capability=(10, 0)), "SM100 DeepGEMM reads UE8M0 scales"),
        (qwen(quant=QuantConfig()), caps(), "needs FP8 w8a8 with 128x128 weight blocks, quant is unquantized"),
        (qwen(quant=QuantConfig.fp8_block(64)), caps(), "quant is fp8_w8a8[64x64]"),
        (MoEConfig(128, 8, 2000, 768, quant=FP8), caps(), "hidden_size K=2000 is not a multiple of 128"),
        (MoEConfig(128, 8, 2048, 700, quant=FP8), caps(), "intermediate_size N=700 is not a multiple of 128"),
        (qwen(dtype=torch.float16), caps(), "DeepGEMM writes bfloat16 outputs"),
        (qwen(max_num_tokens=16), caps(), "below DEEPGEMM_MIN_TOKENS"),
        (qwen(), caps(deep_gemm=False), "needs deep_gemm (ModuleNotFoundError"),
        (qwen(), caps(device="cpu"), "device is cpu"),
    ],
)
def test_deep_gemm_rejections_say_which_condition_failed(config, capabilities, needle):
    sel = select(config, caps=capabilities)
    assert sel.experts.name != "deep_gemm"
    assert needle in verdict(sel, "deep_gemm")
    assert needle in sel.explain()


def test_sm100_with_ue8m0_is_accepted():
    sel = select(
        qwen(quant=QuantConfig.fp8_block(scale_format="ue8m0"), max_num_tokens=4096), caps=caps(capability=(10, 0))
    )
    assert sel.experts.name == "deep_gemm"


def test_threshold_comes_from_the_measured_crossover_of_the_shape():
    # qwen3 (K 2048, N 768) was measured to cross over at 4096 tokens, the DeepSeek shard at 2048.
    sel = select(qwen(max_num_tokens=1024), caps=caps())
    assert sel.experts.name != "deep_gemm"
    assert "max_num_tokens=1024 is below DEEPGEMM_MIN_TOKENS=4096 (measured K=2048 N=768)" in verdict(sel, "deep_gemm")
    assert select(qwen(max_num_tokens=4096), caps=caps()).experts.name == "deep_gemm"
    assert select(dsv3(2048), caps=caps(), prepare_finalize="deepep_ht").experts.name == "deep_gemm"
    below = select(dsv3(1024), caps=caps(), prepare_finalize="deepep_ht")
    assert below.experts.name != "deep_gemm"
    assert "max_num_tokens=1024 is below DEEPGEMM_MIN_TOKENS=2048 (measured K=7168 N=2048)" in verdict(below, "deep_gemm")


def test_unmeasured_shape_takes_the_nearest_measured_crossover(monkeypatch):
    # K*N = 5120 x 8192 is nearest Mixtral's (4096 x 14336) on a log scale.
    assert dg.deepgemm_min_tokens(4096, 14336) == (1024, "measured K=4096 N=14336")
    assert dg.deepgemm_min_tokens(5120, 8192) == (1024, "nearest measured shape K=4096 N=14336")
    assert dg.deepgemm_min_tokens(1024, 512) == (4096, "nearest measured shape K=2048 N=768")
    monkeypatch.setitem(dg.DEEPGEMM_MIN_TOKENS, (4096, 14336), 512)
    assert dg.deepgemm_min_tokens(4096, 14336) == (512, "measured K=4096 N=14336")


def test_batched_deep_gemm_is_silu_only():
    cfg = qwen(activation="gelu")
    sel = select(cfg, caps=caps(), experts="batched_torch", prepare_finalize="batched_local")
    assert "masked path fuses SiLU-mul-quant only" in verdict(sel, "batched_deep_gemm")
    sel = select(qwen(), caps=caps(), prepare_finalize="batched_local")
    assert sel.experts.name == "batched_deep_gemm"


def test_forcing_deep_gemm_where_it_cannot_run_says_why():
    with pytest.raises(BackendUnavailableError, match="needs SM90"):
        select(qwen(), caps=caps(capability=(8, 9)), experts="deep_gemm")


# ---- DeepEP ------------------------------------------------------------------------------------------


def dsv3(max_num_tokens, **kw):
    kw.setdefault("quant", FP8)
    return MoEConfig(256, 8, 7168, 2048, parallel=ParallelConfig(8, 0), max_num_tokens=max_num_tokens, **kw)


def test_decode_sized_ep_picks_low_latency_with_masked_deep_gemm():
    sel = select(dsv3(128), caps=caps())
    assert (sel.prepare_finalize.name, sel.experts.name) == ("deepep_ll", "batched_deep_gemm")
    # Decode-sized batches sit below the measured crossover, so contiguous DeepGEMM is not a candidate.
    assert "below DEEPGEMM_MIN_TOKENS" in verdict(sel, "deep_gemm")


def test_prefill_sized_ep_picks_high_throughput_with_contiguous_deep_gemm():
    sel = select(dsv3(4096), caps=caps())
    assert (sel.prepare_finalize.name, sel.experts.name) == ("deepep_ht", "deep_gemm")
    assert "max_num_tokens=4096 per rank exceeds 511" in verdict(sel, "deepep_ll")


def test_low_latency_rejects_unsupported_hidden_sizes_and_top_k():
    sel = select(MoEConfig(128, 8, 2304, 768, quant=FP8, parallel=ParallelConfig(2, 0)), caps=caps())
    assert "hidden_size=2304 is not one of the low-latency sizes" in verdict(sel, "deepep_ll")
    assert sel.prepare_finalize.name == "deepep_ht"
    sel = select(MoEConfig(128, 12, 2048, 768, quant=FP8, parallel=ParallelConfig(2, 0)), caps=caps())
    assert "top_k=12 exceeds the low-latency limit of 11" in verdict(sel, "deepep_ll")


def test_deepep_rejections():
    no_ep = select(qwen(), caps=caps())
    assert "ep_size=1" in verdict(no_ep, "deepep_ht") and "ep_size=1" in verdict(no_ep, "deepep_ll")
    missing = pytest.raises(BackendUnavailableError)
    with missing as info:
        select(dsv3(128), caps=caps(deep_ep=False), prepare_finalize="deepep_ll")
    assert "needs deep_ep (ModuleNotFoundError" in str(info.value)
    odd = MoEConfig(60, 4, 2048, 256, parallel=ParallelConfig(6, 0), dtype=torch.bfloat16)
    with pytest.raises(BackendUnavailableError, match="ep_size=6: high-throughput kernels run on"):
        select(odd, caps=caps(), prepare_finalize="deepep_ht")
    with pytest.raises(BackendUnavailableError, match="needs CUDA GPUs, device is cpu"):
        select(dsv3(128), caps=caps(device="cpu"), prepare_finalize="deepep_ll")


def test_deepep_device_rules():
    bf16 = MoEConfig(64, 8, 2048, 512, parallel=ParallelConfig(2, 0), max_num_tokens=128)
    sel = select(bf16, caps=caps(capability=(8, 0)), prepare_finalize="deepep_ht")
    assert sel.prepare_finalize.name == "deepep_ht"  # intranode bf16 runs on Ampere
    assert "low-latency kernels need SM90 features, device is sm80" in verdict(sel, "deepep_ll")
    fp8 = MoEConfig(64, 8, 2048, 512, quant=FP8, parallel=ParallelConfig(2, 0), max_num_tokens=4096)
    with pytest.raises(BackendUnavailableError, match="FP8 dispatch need SM90 features, device is sm80"):
        select(fp8, caps=caps(capability=(8, 0)), prepare_finalize="deepep_ht")
    with pytest.raises(BackendUnavailableError, match="needs SM80 or newer, device is sm75"):
        select(bf16, caps=caps(capability=(7, 5)), prepare_finalize="deepep_ht")
