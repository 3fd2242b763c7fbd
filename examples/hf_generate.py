"""Greedy generation with a transformers MoE model, with transformers' eager experts and with moe_plugin's.

    python examples/hf_generate.py                          # tiny random Qwen3-MoE, float32
    python examples/hf_generate.py --family mixtral --dtype bfloat16
    python examples/hf_generate.py --model /path/to/hf/checkpoint

Needs transformers >= 5 (its experts interface). Importing ``moe_plugin.integrations.transformers``
registers ``experts_implementation="moe_plugin"``; the model is loaded once and switched between the two
implementations with ``set_experts_implementation``.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

PROMPTS = ["one two three four", "red green blue", "the king and the queen"]


def generate(model, tokenizer, max_new_tokens: int) -> tuple[list[str], torch.Tensor, float]:
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    seconds = time.perf_counter() - start
    new = out[:, batch["input_ids"].shape[1] :]
    return tokenizer.batch_decode(new, skip_special_tokens=True), new, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Hugging Face checkpoint directory (default: a tiny random model)")
    parser.add_argument("--family", default="qwen3_moe", help="tiny model family: qwen3_moe, mixtral, deepseek_v3")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()

    import transformers

    import moe_plugin.integrations.transformers as mp_hf

    dtype = getattr(torch, args.dtype)
    if args.model:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, experts_implementation="eager")
    else:
        from moe_plugin.integrations import tiny_moe_config, tiny_tokenizer

        torch.manual_seed(0)
        tokenizer = tiny_tokenizer()
        model = transformers.AutoModelForCausalLM.from_config(
            tiny_moe_config(args.family), dtype=dtype, experts_implementation="eager"
        )
    model.eval()
    tokenizer.padding_side = "left"

    results = {}
    for implementation in ("eager", "moe_plugin"):
        model.set_experts_implementation(implementation)
        generate(model, tokenizer, 2)  # warm-up: first-call allocations and kernel selection
        calls = mp_hf.call_count()
        texts, tokens, seconds = generate(model, tokenizer, args.max_new_tokens)
        results[implementation] = tokens
        n = tokens.numel()
        print(f"experts_implementation={implementation!r}: {n} tokens in {seconds:.3f} s ({n / seconds:.1f} tok/s), "
              f"moe_plugin experts calls: {mp_hf.call_count() - calls}")
        for prompt, text in zip(PROMPTS, texts):
            print(f"  {prompt!r} -> {text!r}")
    same = torch.equal(results["eager"], results["moe_plugin"])
    print("identical greedy tokens:", same)
    if not same and dtype != torch.float32:
        print("(in 16-bit dtypes two correct kernels round differently; near-tied logits of a random model can flip)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
