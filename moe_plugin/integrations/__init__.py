"""Engine integrations: vLLM (``moe_plugin.integrations.vllm``, loaded through vLLM's plugin system) and
transformers (``moe_plugin.integrations.transformers``, registered on import).

Neither engine is a dependency of moe_plugin: each integration module imports its engine itself. This
package also makes the tiny random MoE checkpoints that the integration tests and examples run, so that
trying an engine needs no download.
"""

from __future__ import annotations

import json
import os
import re

import torch

TINY_WORDS = tuple(
    "the a one two three four five six seven eight nine ten red green blue cat dog bird fish tree sun moon star "
    "sea sky road city house door window book pen cup king queen river stone fire water wind rain snow light dark "
    "day night up down left right big small old new fast slow gold silver iron wood".split()
)
"""Words of the tiny checkpoints' vocabulary (after the special tokens)."""

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")
TINY_VOCAB_SIZE = 64

# Each family's config for a model small enough to load in seconds on two CPU cores. vLLM's CPU attention
# rejects head_dim 16, so heads are 64 wide; MoE widths are multiples of 32 (vLLM's CPU grouped GEMM).
_FAMILIES = {
    "qwen3_moe": dict(
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        intermediate_size=128,
        norm_topk_prob=True,
        head_dim=64,
    ),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=64),
    "deepseek_v3": dict(
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        intermediate_size=128,
        n_shared_experts=1,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        kv_lora_rank=32,
        q_lora_rank=None,
        qk_nope_head_dim=32,
        qk_rope_head_dim=32,
        v_head_dim=64,
        rope_interleave=True,
    ),
}
TINY_FAMILIES = tuple(_FAMILIES)


# The config key of each family's per-expert width (N).
_EXPERT_WIDTH_KEY = {"qwen3_moe": "moe_intermediate_size", "mixtral": "intermediate_size", "deepseek_v3": "moe_intermediate_size"}


def tiny_moe_config(
    model_type: str = "qwen3_moe", *, num_hidden_layers: int = 2, initializer_range: float = 0.2, **overrides
):
    """A transformers config for a tiny random MoE model of ``model_type`` (one of ``TINY_FAMILIES``):
    hidden 128, 8 experts, top-2, 64-token vocabulary; ``overrides`` replace config fields.

    ``initializer_range`` is larger than real models' 0.02 so that the random model's next-token logits are
    well separated: greedy decoding then compares kernels, not rounding noise between near-tied logits.
    """
    if model_type not in _FAMILIES:
        raise ValueError(f"model_type must be one of {TINY_FAMILIES}, got {model_type!r}")
    from transformers import AutoConfig

    fields = dict(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=128,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=initializer_range,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        **_FAMILIES[model_type],
    )
    fields.update(overrides)
    return AutoConfig.for_model(model_type, **fields)


def tiny_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over ``TINY_WORDS`` (64 ids), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + TINY_WORDS)}
    if len(vocab) != TINY_VOCAB_SIZE:
        raise AssertionError(f"tiny vocabulary has {len(vocab)} entries, expected {TINY_VOCAB_SIZE}")
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


EXPERTS_FORMATS = ("bf16", "fp8", "fp8_dequantized")
FP8_BLOCK = 128
_EXPERT_WEIGHT = re.compile(r"\.experts\.\d+\.\w+\.weight$")


def quantize_fp8_block(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [rows, cols]`` -> (``float8_e4m3fn`` weight, fp32 scales ``[ceil(rows/block), ceil(cols/block)]``)
    with ``w ~= q * scale`` blockwise: DeepSeek-V3's ``weight_scale_inv`` convention."""
    rows, cols = w.shape
    gr, gc = -(-rows // block), -(-cols // block)
    padded = torch.zeros(gr * block, gc * block, dtype=torch.float32)
    padded[:rows, :cols] = w.float()
    tiles = padded.view(gr, block, gc, block)
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
    q = (tiles / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(gr * block, gc * block)
    return q[:rows, :cols].contiguous(), scale


def dequantize_fp8_block(q: torch.Tensor, scale: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """Inverse of ``quantize_fp8_block`` (fp32)."""
    full = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)
    return q.float() * full[: q.shape[0], : q.shape[1]]


def save_tiny_moe_checkpoint(
    path: str | os.PathLike, model_type: str = "qwen3_moe", *, seed: int = 0, experts: str = "bf16", **config_kwargs
):
    """Write a tiny random MoE model (``tiny_moe_config``) and its tokenizer to ``path`` in the Hugging Face
    layout; returns ``path`` as a string. Same seed, same weights. transformers loads every type; vLLM loads
    ``qwen3_moe`` and ``mixtral`` (its DeepSeek-V3 path needs MLA head sizes and a ``topk_method`` this tiny
    ``deepseek_v3`` config does not have).

    ``experts="fp8"`` stores the routed experts as block-FP8 (128x128 ``weight_scale_inv`` scales, a
    ``quantization_config`` of ``quant_method: fp8`` that leaves every other layer unquantized, as CPUs
    without AMX run no FP8 linear layers in vLLM); ``"fp8_dequantized"`` stores the same FP8-rounded expert
    weights in bf16, the reference an FP8 run is compared with. Both default the experts' width to 128, a
    whole FP8 block.
    """
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    if experts not in EXPERTS_FORMATS:
        raise ValueError(f"experts must be one of {EXPERTS_FORMATS}, got {experts!r}")
    if experts != "bf16":
        config_kwargs.setdefault(_EXPERT_WIDTH_KEY[model_type], FP8_BLOCK)
    config = tiny_moe_config(model_type, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    path = os.fspath(path)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    if experts == "bf16":
        return path

    weights_file = os.path.join(path, "model.safetensors")
    state = load_file(weights_file)
    out, ignored = {}, []
    for name, tensor in state.items():
        if _EXPERT_WEIGHT.search(name):
            q, scale = quantize_fp8_block(tensor)
            if experts == "fp8":
                out[name] = q
                out[name[: -len("weight")] + "weight_scale_inv"] = scale
            else:
                out[name] = dequantize_fp8_block(q, scale).to(tensor.dtype)
            continue
        out[name] = tensor
        if name.endswith(".weight") and tensor.dim() == 2 and "embed_tokens" not in name and "lm_head" not in name:
            ignored.append(name[: -len(".weight")])
    save_file(out, weights_file, metadata={"format": "pt"})
    if experts == "fp8":
        config_file = os.path.join(path, "config.json")
        with open(config_file) as f:
            saved = json.load(f)
        saved["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
            "ignored_layers": sorted(ignored),
        }
        with open(config_file, "w") as f:
            json.dump(saved, f, indent=2)
    return path
