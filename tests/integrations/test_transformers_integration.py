"""experts_implementation="moe_plugin" in real transformers models (tiny random ones, built offline)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.integrations.moe", reason="transformers < 5 has no ExpertsInterface")

import moe_plugin.integrations.transformers as mp_hf  # noqa: E402  (registers "moe_plugin")
from moe_plugin.integrations import TINY_FAMILIES, tiny_moe_config  # noqa: E402

PROMPTS = torch.tensor([[4, 5, 6, 7, 8], [9, 10, 11, 12, 13], [20, 30, 40, 50, 60]])


def tiny_model(family, dtype, implementation):
    torch.manual_seed(0)
    config = tiny_moe_config(family)
    return transformers.AutoModelForCausalLM.from_config(
        config, dtype=dtype, experts_implementation=implementation
    ).eval()


def moe_layers(model):
    return [m for m in model.modules() if type(m).__name__.endswith("Experts") and hasattr(m, "gate_up_proj")]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_greedy_generate_matches_eager_experts(family):
    """float32, so that greedy decoding compares the kernels and not bf16 rounding of near-tied logits."""
    model = tiny_model(family, torch.float32, "eager")
    num_moe = len(moe_layers(model))
    assert num_moe >= 1
    want = model.generate(PROMPTS, max_new_tokens=12, do_sample=False)
    model.set_experts_implementation("moe_plugin")
    assert model.config._experts_implementation == "moe_plugin"
    before = mp_hf.call_count()
    got = model.generate(PROMPTS, max_new_tokens=12, do_sample=False)
    # one call per MoE layer per decoding step (prefill included)
    assert mp_hf.call_count() - before == num_moe * 12
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_bf16_logits_close_to_eager_experts(family):
    eager = tiny_model(family, torch.bfloat16, "eager")
    plugin = tiny_model(family, torch.bfloat16, "moe_plugin")
    with torch.no_grad():
        want = eager(PROMPTS).logits.float()
        got = plugin(PROMPTS).logits.float()
    # bf16 rounding of two different summation orders; a wrong expert or weight is off by O(1)
    assert (got - want).abs().max().item() < 0.05 * want.abs().max().item()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() > 0.9


def naive_layer(experts, x, ids, weights):
    out = torch.zeros(x.shape, dtype=torch.float64)
    n = experts.down_proj.shape[2]
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e >= experts.gate_up_proj.shape[0]:
                continue  # transformers' EP sentinel: another rank's expert
            h = experts.gate_up_proj[e].double() @ x[t].double()
            a = torch.nn.functional.silu(h[:n]) * h[n:]
            out[t] += float(weights[t, j]) * (experts.down_proj[e].double() @ a)
    return out


def test_experts_forward_against_naive_loop_with_ep_sentinels():
    model = tiny_model("qwen3_moe", torch.float32, "moe_plugin")
    experts = moe_layers(model)[0]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 128, generator=g)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(7)])
    weights = torch.rand(7, 2, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(experts(x, ids, weights).double(), naive_layer(experts, x, ids, weights),
                                   rtol=1e-4, atol=1e-4)
        experts._is_expert_parallel = True
        ids[::2, 1] = 8  # sentinel id = num_experts: routed to an expert on another rank
        torch.testing.assert_close(experts(x, ids, weights).double(), naive_layer(experts, x, ids, weights),
                                   rtol=1e-4, atol=1e-4)


def test_unsupported_experts_raise_with_reason():
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    config = GptOssConfig(hidden_size=64, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    config._experts_implementation = "moe_plugin"
    experts = GptOssExperts(config)
    assert mp_hf.unsupported_reason(experts) == "expert biases"
    x = torch.randn(3, 64)
    ids = torch.tensor([[0, 1], [2, 3], [1, 2]])
    with pytest.raises(ValueError, match='experts_implementation="moe_plugin" cannot run GptOssExperts: expert biases'):
        experts(x, ids, torch.rand(3, 2))


def test_registered_name_is_accepted_by_from_config():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert ALL_EXPERTS_FUNCTIONS["moe_plugin"] is mp_hf.experts_forward
    with pytest.raises(ValueError, match="not supported"):
        tiny_model("mixtral", torch.float32, "no_such_experts")
