"""The oracle: choice, explanation, overrides."""

import subprocess
import sys

import pytest
import torch

from moe_plugin import MoEConfig, QuantConfig, explain, select_kernel
from moe_plugin.oracle import BackendUnavailableError, Capabilities, probe, select


def cpu_caps(**modules):
    return Capabilities("cpu", None, "cpu", {"triton": "", "deep_gemm": "missing", "deep_ep": "missing", **modules})


CFG = MoEConfig(8, 2, 32, 16, dtype=torch.float32)


def test_cpu_default_is_local_torch():
    sel = select(CFG, caps=cpu_caps())
    assert sel.prepare_finalize.name == "local"
    assert sel.experts.name == "torch"


def test_explain_lists_every_candidate_once_with_one_verdict():
    text = explain(CFG, "cpu")
    from moe_plugin.oracle import EXPERTS_REGISTRY, PREPARE_FINALIZE_REGISTRY

    for entry in EXPERTS_REGISTRY + PREPARE_FINALIZE_REGISTRY:
        lines = [l for l in text.splitlines() if l.strip().split(" ")[0] == entry.name]
        assert len(lines) == 1, entry.name
        assert lines[0].split(None, 1)[1].strip()  # a verdict, never empty
    assert text.count("chosen") == 2


def test_forced_by_argument_and_env(monkeypatch):
    sel = select(CFG, caps=cpu_caps(), experts="batched_torch", prepare_finalize="batched_local")
    assert (sel.prepare_finalize.name, sel.experts.name) == ("batched_local", "batched_torch")
    monkeypatch.setenv("MOE_PLUGIN_EXPERTS", "batched_torch")
    monkeypatch.setenv("MOE_PLUGIN_PREPARE_FINALIZE", "batched_local")
    sel = select(CFG, caps=cpu_caps())
    assert (sel.prepare_finalize.name, sel.experts.name) == ("batched_local", "batched_torch")
    assert "experts forced to 'batched_torch'" in sel.explain()


def test_forced_backend_that_cannot_run_says_why():
    with pytest.raises(BackendUnavailableError, match="deep_gemm"):
        select(CFG, caps=cpu_caps(), experts="deep_gemm")
    ep = MoEConfig(8, 2, 32, 16, parallel=__import__("moe_plugin").ParallelConfig(2, 0))
    with pytest.raises(BackendUnavailableError, match="ep_size=2"):
        select(ep, caps=cpu_caps(), prepare_finalize="local")


def verdict_of(text, name):
    return next(l.split(None, 1)[1].strip() for l in text.splitlines() if l.strip().split(" ")[0] == name)


def test_explain_says_why_a_higher_backend_went_unpaired():
    # Forcing a batched experts backend leaves the (higher-priority) local prepare without a partner: that,
    # not a lower priority, is why it lost.
    text = select(CFG, caps=cpu_caps(), experts="batched_torch").explain()
    assert verdict_of(text, "batched_local") == "chosen"
    assert verdict_of(text, "local") == "no usable experts backend takes the standard format"


def test_no_pair_explains_every_usable_candidate():
    with pytest.raises(BackendUnavailableError) as info:
        select(CFG, caps=cpu_caps(), experts="batched_torch", prepare_finalize="local")
    text = str(info.value)
    assert verdict_of(text, "local") == "no usable experts backend takes the standard format"
    assert verdict_of(text, "batched_torch") == "no usable prepare_finalize backend produces the batched format"


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown experts backend"):
        select(CFG, caps=cpu_caps(), experts="nope")


def test_select_kernel_runs():
    kernel = select_kernel(CFG, "cpu")
    assert kernel.describe() == "local + torch (unquantized)"


def test_probe_cpu():
    caps = probe("cpu")
    assert caps.device_type == "cpu" and caps.capability is None
    assert set(caps.modules) == {"triton", "deep_gemm", "deep_ep"}


def test_info_cli():
    out = subprocess.run(
        [sys.executable, "-m", "moe_plugin", "info", "--device", "cpu"], capture_output=True, text=True, check=True
    ).stdout
    assert "optional modules" in out and "chosen: prepare_finalize=local experts=torch" in out


def test_fused_experts_follows_forced_backend_env(monkeypatch):
    from moe_plugin import fused_experts
    from moe_plugin.functional import _kernel_for
    from test_fused_experts import make_case

    x, w1, w2, w, ids = make_case(5, 4, 2, 16, 8)
    fused_experts(x, w1, w2, w, ids)
    monkeypatch.setenv("MOE_PLUGIN_EXPERTS", "nope")
    with pytest.raises(ValueError, match="unknown experts backend 'nope'"):
        fused_experts(x, w1, w2, w, ids)  # not served from the cache built before the variable was set
    _kernel_for.cache_clear()
