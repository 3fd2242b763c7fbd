"""DeepGEMM experts vs Triton experts, FP8 w8a8 (128x128 blocks), CUDA-graph replay medians.

    python scripts/bench_deepgemm.py --out bench_deepgemm.json [--shapes dsv3-ep8] [--tokens 1024 4096]
    python scripts/bench_deepgemm.py --breakdown --shapes qwen3-30b-a3b dsv3-ep8 --tokens 4096 16384

The default run (two shapes, three sizes, the DeepGEMM rows only) is sized to finish in a few minutes on an
H100 including DeepGEMM's JIT compiles; ``--backends all`` adds the masked and Triton rows and the small
sizes (``--tokens 64 256 ...``) the crossover needs.

``--breakdown`` also times every stage of DeepGemmExperts.apply on its own, on the rows the call itself
uses (exact with host counts, the worst case otherwise): prepare's quantization, ep_scatter of FP8 rows,
ep_scatter quantizing bf16 rows (the two stages it replaces), GEMM1, the
activation + quantization both ways (two-step, fused), GEMM2, ep_gather; and prints one table.

Shapes (one GPU; the DeepSeek-V3 row is one EP8 rank: 32 of 256 experts, routing over all 256 so about
1/8 of the slots are local):

    qwen3-30b-a3b   E=128 top-8 K=2048 N=768
    mixtral-8x7b    E=8   top-2 K=4096 N=14336
    dsv3-ep8        E=256 (32 local) top-8 K=7168 N=2048

Backends per (shape, M): ``deep_gemm`` (DeepGemmExperts, whole call incl. quantization, permute and
unpermute; behind the local prepare the input is quantized inside the scatter), ``deep_gemm_prequant``
(the same with prepare quantizing every token first, as before that fusion), ``deep_gemm_two_step`` (the activation and its quantization unfused: the before of that
fusion), ``deep_gemm_gemm_only`` (its two grouped GEMMs on pre-permuted data), ``batched_deep_gemm``
(masked, the experts call on a ready batched layout, decode sizes only), ``triton_fp8`` and
``triton_bf16`` (moe_plugin.experts.triton, when present). Every timing is the median of CUDA-graph
replays (eager when a backend cannot be captured, marked ``"mode": "eager"``).

The dsv3-ep8 shape is one rank of expert parallelism: its experts get what DeepEP high-throughput
hands over, FP8 tokens quantized on the sender and the per-expert counts on the host
(``HostCountsPrepare``), so its ``deep_gemm`` and ``deep_gemm_prequant`` rows time the same path, the
experts call alone. (Before 2026-11-25's third session that row ran behind a local prepare and included
the quantization; docs/benchmarks.md says how its numbers relate.)

The JSON's ``crossover`` gives, per shape, the smallest M where DeepGemmExperts beats the Triton FP8
experts: the value for ``moe_plugin.experts.deep_gemm.DEEPGEMM_MIN_TOKENS``. ``targets`` compares with
the reference numbers: whole call within 1.15x of GEMM-only 606 / 709 / 1405 us at M = 1024 / 4096 /
16384 on dsv3-ep8; masked decode 515-535 us.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import traceback

import torch

from moe_plugin import ExpertWeights, ModularKernel, MoEConfig, ParallelConfig, QuantConfig
from moe_plugin.distributed import build_expert_map
from moe_plugin.modular import ExpertTokensMetadata, PreparedTokens
from moe_plugin.ops.quant import quantize_block_weight
from moe_plugin.ops.scheme import quantize_activation
from moe_plugin.prepare_finalize.local import BatchedLocalPrepareAndFinalize, LocalPrepareAndFinalize

SHAPES = {
    # name: (global experts, local experts, top-k, K, N, ep_size)
    "qwen3-30b-a3b": (128, 128, 8, 2048, 768, 1),
    "mixtral-8x7b": (8, 8, 2, 4096, 14336, 1),
    "dsv3-ep8": (256, 32, 8, 7168, 2048, 8),
}
TOKENS = (1024, 4096, 16384)
DEFAULT_SHAPES = ("qwen3-30b-a3b", "dsv3-ep8")
BACKENDS = ("deep_gemm", "deep_gemm_prequant", "deep_gemm_two_step", "deep_gemm_gemm_only", "batched_deep_gemm", "triton_fp8", "triton_bf16")
DEFAULT_BACKENDS = ("deep_gemm", "deep_gemm_prequant", "deep_gemm_two_step", "deep_gemm_gemm_only")
STAGES = ("prepare_quant", "scatter", "scatter_quant", "gemm1", "act_quant_two_step", "act_quant_fused", "gemm2", "gather")
GEMM_ONLY_TARGETS_US = {1024: 606.0, 4096: 709.0, 16384: 1405.0}
MASKED_DECODE_TARGET_US = (515.0, 535.0)
WHOLE_CALL_SLACK = 1.15


def time_callable(fn, iters: int, warmup: int) -> tuple[float, str]:
    """Median microseconds of ``fn``: CUDA-graph replays when it captures, else eager launches."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    mode = "graph"
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
        run()
    except Exception:
        torch.cuda.synchronize()
        mode, run = "eager", fn
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
    return statistics.median(times), mode


def make_weights(e: int, k: int, n: int, seed: int) -> tuple[ExpertWeights, ExpertWeights]:
    """(FP8 block weights, bf16 weights) of the same random experts, built one expert at a time."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    w1 = torch.empty(e, 2 * n, k, device="cuda", dtype=torch.bfloat16)
    w2 = torch.empty(e, k, n, device="cuda", dtype=torch.bfloat16)
    q1 = torch.empty(e, 2 * n, k, device="cuda", dtype=torch.float8_e4m3fn)
    q2 = torch.empty(e, k, n, device="cuda", dtype=torch.float8_e4m3fn)
    s1 = torch.empty(e, math.ceil(2 * n / 128), math.ceil(k / 128), device="cuda")
    s2 = torch.empty(e, math.ceil(k / 128), math.ceil(n / 128), device="cuda")
    for i in range(e):
        a = torch.randn(2 * n, k, device="cuda", generator=g) * 0.02
        b = torch.randn(k, n, device="cuda", generator=g) * 0.02
        w1[i], w2[i] = a, b
        (q1[i], s1[i]), (q2[i], s2[i]) = quantize_block_weight(a), quantize_block_weight(b)
    return ExpertWeights(q1, q2, s1, s2), ExpertWeights(w1, w2)


def routing(m: int, e: int, top_k: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w, ids = torch.topk(torch.softmax(torch.randn(m, e, device="cuda", generator=g), -1), top_k)
    return w.float(), ids.to(torch.int32)


def quant_for_device() -> QuantConfig:
    ue8m0 = torch.cuda.get_device_capability()[0] == 10
    return QuantConfig.fp8_block(scale_format="ue8m0" if ue8m0 else "fp32")


class HostCountsPrepare(LocalPrepareAndFinalize):
    """What an EP rank's experts receive from DeepEP high-throughput: FP8 tokens (quantized on the sender,
    before the wire, so outside this rank's experts call) and the per-expert counts on the host."""

    can_leave_quant_to_experts = False  # tokens arrive quantized under expert parallelism

    def __init__(self, quant: QuantConfig, counts: torch.Tensor, hidden_states: torch.Tensor):
        super().__init__(quant)
        self.meta = ExpertTokensMetadata(counts, counts.cpu())
        self.received = quantize_activation(hidden_states, quant, None)

    def prepare(self, hidden_states, topk_weights, topk_ids, **kwargs):
        a1q, scale = self.received
        return PreparedTokens(hidden_states=a1q, scale=scale, topk_ids=topk_ids, topk_weights=topk_weights,
                              expert_tokens_meta=self.meta)


class Bench:
    def __init__(self, args):
        self.args = args
        self.rows: list[dict] = []

    def record(self, shape, m, backend, fn, **extra):
        try:
            us, mode = time_callable(fn, self.args.iters, self.args.warmup)
            row = dict(shape=shape, M=m, backend=backend, us=round(us, 2), mode=mode, **extra)
        except Exception as exc:
            row = dict(shape=shape, M=m, backend=backend, us=None, error=f"{type(exc).__name__}: {exc}"[:400])
            if self.args.verbose:
                traceback.print_exc()
        torch.cuda.synchronize()
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        return row


def bench_stages(bench: Bench, name: str, m: int, dg, prepared, x, w, ids, emap, m_sum: int, act: str = "silu") -> None:
    """Each stage of DeepGemmExperts.apply alone, on ``m_sum`` rows (what the call uses)."""
    from moe_plugin.config import ScaleFormat
    from moe_plugin.experts.deep_gemm import DEEPGEMM_BLOCK, mn_major_scales
    from moe_plugin.ops.activation import apply_activation, gated_act_fp8_quant
    from moe_plugin.ops.permute import ep_gather, ep_scatter
    from moe_plugin.ops.quant import per_token_group_quant_fp8

    e_local, n2, k = prepared.w1.shape
    n = n2 // 2
    ue8m0 = dg.quant.scale_format is ScaleFormat.UE8M0
    a1q, a1s = per_token_group_quant_fp8(x, DEEPGEMM_BLOCK, use_ue8m0=ue8m0)
    align = deep_gemm_alignment()
    hid = torch.empty(m_sum, k, device="cuda", dtype=torch.float8_e4m3fn)
    hid_s = mn_major_scales(m_sum, k // DEEPGEMM_BLOCK, x.device)
    res = ep_scatter(a1q, a1s, ids, e_local, emap, alignment=align, m_sum=m_sum, fill_invalid_expert=-1, out=hid,
                     out_scales=hid_s)
    mm1 = torch.empty(m_sum, n2, device="cuda", dtype=torch.bfloat16)
    dg._gemm(res.hidden_states, res.scales, prepared.w1, prepared.w1_scale, mm1, res.m_indices)
    act_buf = torch.empty(m_sum, n, device="cuda", dtype=torch.bfloat16)
    a2q = torch.empty(m_sum, n, device="cuda", dtype=torch.float8_e4m3fn)
    a2s = mn_major_scales(m_sum, n // DEEPGEMM_BLOCK, x.device)
    gated_act_fp8_quant(mm1, act, DEEPGEMM_BLOCK, m_indices=res.m_indices, use_ue8m0=ue8m0, out=a2q, out_scales=a2s)
    mm2 = torch.empty(m_sum, k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(m, k, device="cuda", dtype=torch.bfloat16)
    extra = dict(m_sum=m_sum, live_rows=int(res.expert_num_tokens.sum()))

    def two_step():
        apply_activation(act, mm1, out=act_buf)
        per_token_group_quant_fp8(act_buf, DEEPGEMM_BLOCK, use_ue8m0=ue8m0, column_major_scales=True)

    stages = {
        "prepare_quant": lambda: per_token_group_quant_fp8(x, DEEPGEMM_BLOCK, use_ue8m0=ue8m0),
        "scatter": lambda: ep_scatter(a1q, a1s, ids, e_local, emap, alignment=align, m_sum=m_sum,
                                      fill_invalid_expert=-1, out=hid, out_scales=hid_s),
        "scatter_quant": lambda: ep_scatter(x, None, ids, e_local, emap, alignment=align, m_sum=m_sum,
                                            fill_invalid_expert=-1, out=hid, out_scales=hid_s,
                                            quant_group_size=DEEPGEMM_BLOCK, use_ue8m0=ue8m0),
        "gemm1": lambda: dg._gemm(res.hidden_states, res.scales, prepared.w1, prepared.w1_scale, mm1, res.m_indices),
        "act_quant_two_step": two_step,
        "act_quant_fused": lambda: gated_act_fp8_quant(mm1, act, DEEPGEMM_BLOCK, m_indices=res.m_indices,
                                                       use_ue8m0=ue8m0, out=a2q, out_scales=a2s),
        "gemm2": lambda: dg._gemm(a2q, a2s, prepared.w2, prepared.w2_scale, mm2, res.m_indices),
        "gather": lambda: ep_gather(mm2, w, res.inv_perm, out=out),
    }
    for stage, fn in stages.items():
        bench.record(name, m, f"stage:{stage}", fn, **extra)


def bench_gemm_only(bench: Bench, name: str, m: int, dg, prepared, x, ids, emap, m_sum: int, local_rows: int) -> None:
    """The two grouped GEMMs on data already in the contiguous layout (exact rows); the whole calls of the
    same (shape, M) get their ratio to it."""
    from moe_plugin.experts.deep_gemm import mn_major_scales
    from moe_plugin.ops.permute import ep_scatter
    from moe_plugin.ops.quant import per_token_group_quant_fp8

    e_local, n2, k = prepared.w1.shape
    n = n2 // 2
    align = deep_gemm_alignment()

    # GEMM-only: the two grouped GEMMs on data already in the contiguous layout (exact rows)
    a1q, a1s = per_token_group_quant_fp8(x, 128)
    scattered = ep_scatter(a1q, a1s, ids, e_local, emap, alignment=align, m_sum=m_sum, fill_invalid_expert=-1,
                           out_scales=mn_major_scales(m_sum, k // 128, x.device))
    a, sa, m_indices = scattered.hidden_states, scattered.scales, scattered.m_indices
    mid = torch.randn(m_sum, n, device="cuda", dtype=torch.bfloat16)
    a2, s2 = per_token_group_quant_fp8(mid, 128, column_major_scales=True)
    out1 = torch.empty(m_sum, 2 * n, device="cuda", dtype=torch.bfloat16)
    out2 = torch.empty(m_sum, k, device="cuda", dtype=torch.bfloat16)

    def gemms():
        dg._gemm(a, sa, prepared.w1, prepared.w1_scale, out1, m_indices)
        dg._gemm(a2, s2, prepared.w2, prepared.w2_scale, out2, m_indices)

    only = bench.record(name, m, "deep_gemm_gemm_only", gemms, local_rows=local_rows, m_sum=m_sum)
    for r in bench.rows:
        if r["shape"] == name and r["M"] == m and r["backend"] in ("deep_gemm", "deep_gemm_prequant", "deep_gemm_two_step"):
            if r.get("us") and only.get("us"):
                r["ratio_to_gemm_only"] = round(r["us"] / only["us"], 3)


def deep_gemm_alignment() -> int:
    from moe_plugin.experts.deep_gemm import deep_gemm_api

    return deep_gemm_api().alignment


def bench_shape(bench: Bench, name: str, tokens: list[int], triton_cls) -> None:
    from moe_plugin.experts.batched_deep_gemm import BatchedDeepGemmExperts
    from moe_plugin.experts.deep_gemm import DeepGemmExperts, deep_gemm_api, local_expert_ids_of_slots
    from moe_plugin.ops.permute import compute_aligned_M

    e_global, e_local, top_k, k, n, ep = SHAPES[name]
    quant = quant_for_device()
    fp8_weights, bf16_weights = make_weights(e_local, k, n, seed=1)
    parallel = ParallelConfig(ep, 0)
    emap = build_expert_map(e_global, parallel, "cuda")
    kw = dict(global_num_experts=e_global, expert_map=emap, check_inputs=False)
    for m in tokens:
        cfg = MoEConfig(e_global, top_k, k, n, quant=quant, parallel=parallel, max_num_tokens=max(m, 1))
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w, ids = routing(m, e_global, top_k, seed=m)
        dg = DeepGemmExperts(cfg)
        prepared = dg.prepare_weights(fp8_weights)
        local_ids = local_expert_ids_of_slots(ids, emap)
        counts = torch.bincount(local_ids[local_ids >= 0].flatten(), minlength=e_local).to(torch.int32)
        # The EP shard runs behind DeepEP high-throughput, which hands the per-expert counts over on the
        # host; without EP the experts see no counts and size the layout for the worst case under a graph.
        pf = HostCountsPrepare(quant, counts, x) if ep > 1 else LocalPrepareAndFinalize(quant)
        backends = bench.args.backends
        if "deep_gemm" in backends:
            kernel = ModularKernel(pf, dg)
            bench.record(name, m, "deep_gemm", lambda: kernel(x, fp8_weights, w, ids, **kw))
        if "deep_gemm_prequant" in backends:
            dgp = DeepGemmExperts(cfg)
            dgp.quantizes_own_input = False
            kernelp = ModularKernel(pf, dgp)  # a prepare may serve kernels whose experts differ
            bench.record(name, m, "deep_gemm_prequant", lambda: kernelp(x, fp8_weights, w, ids, **kw))
        if "deep_gemm_two_step" in backends:
            dg2 = DeepGemmExperts(cfg)
            dg2.fuse_activation_quant = False
            kernel2 = ModularKernel(pf, dg2)
            bench.record(name, m, "deep_gemm_two_step", lambda: kernel2(x, fp8_weights, w, ids, **kw))

        align = deep_gemm_api().alignment
        host_meta = ExpertTokensMetadata(counts, counts.cpu())
        m_sum = max(compute_aligned_M(m, top_k, e_local, align, host_meta), align)
        if bench.args.breakdown:
            # the rows the call uses under a CUDA graph: exact with host counts, else the worst case
            m_call = m_sum if ep > 1 else max(compute_aligned_M(m, top_k, e_local, align), align)
            bench_stages(bench, name, m, dg, prepared, x, w, ids, emap, m_call)
        if "deep_gemm_gemm_only" in backends:
            bench_gemm_only(bench, name, m, dg, prepared, x, ids, emap, m_sum, int(counts.sum()))

        # masked: the experts call on a batched layout; for the EP shard, the layout DeepEP low-latency
        # would hand over (all ranks' tokens, T = M * ep rows per expert); decode sizes only
        if "batched_deep_gemm" in backends and m <= (511 if ep > 1 else 1024):
            bcfg = MoEConfig(e_global, top_k, k, n, quant=quant, parallel=parallel, max_num_tokens=m)
            t = m * ep
            all_w, all_ids = routing(m * ep, e_global, top_k, seed=m + 7)
            xb = torch.randn(m * ep, k, device="cuda", dtype=torch.bfloat16)
            pf = BatchedLocalPrepareAndFinalize(quant, t, e_local)
            prep = pf.prepare(xb, all_w, all_ids, num_experts=e_global, expert_map=emap,
                              apply_router_weight_on_input=False, a1_scale=None)
            bdg = BatchedDeepGemmExperts(bcfg)
            ws13 = torch.empty(e_local, t, 2 * n, device="cuda", dtype=torch.bfloat16)
            bout = torch.empty(e_local, t, k, device="cuda", dtype=torch.bfloat16)
            scale = prep.scale.transpose(1, 2).contiguous().transpose(1, 2)  # DeepEP's column-major scales

            def masked():
                bdg.apply(bout, prep.hidden_states, fp8_weights, w, ids, activation="silu",
                          global_num_experts=e_global, expert_map=None, a1q_scale=scale, workspace13=ws13,
                          workspace2=ws13, expert_tokens_meta=prep.expert_tokens_meta,
                          apply_router_weight_on_input=False)

            bench.record(name, m, "batched_deep_gemm", masked, rows_per_expert=t,
                         max_count=int(prep.expert_tokens_meta.expert_num_tokens.max()))
            del ws13, bout, prep

        if triton_cls is not None and "triton_fp8" in backends:
            tk = ModularKernel(LocalPrepareAndFinalize(quant), triton_cls(cfg))
            bench.record(name, m, "triton_fp8", lambda: tk(x, fp8_weights, w, ids, **kw))
        if triton_cls is not None and "triton_bf16" in backends:
            bcfg16 = MoEConfig(e_global, top_k, k, n, quant=QuantConfig(), parallel=parallel, max_num_tokens=max(m, 1))
            tk16 = ModularKernel(LocalPrepareAndFinalize(QuantConfig()), triton_cls(bcfg16))
            bench.record(name, m, "triton_bf16", lambda: tk16(x, bf16_weights, w, ids, **kw))
        torch.cuda.empty_cache()


def summarize(rows: list[dict]) -> dict:
    def us(shape, m, backend):
        for r in rows:
            if (r["shape"], r["M"], r["backend"]) == (shape, m, backend) and r.get("us"):
                return r["us"]
        return None

    crossover = {}
    for shape in sorted({r["shape"] for r in rows}):
        ms = sorted({r["M"] for r in rows if r["shape"] == shape})
        wins = [m for m in ms if us(shape, m, "deep_gemm") and us(shape, m, "triton_fp8")
                and us(shape, m, "deep_gemm") < us(shape, m, "triton_fp8")]
        # smallest M from which DeepGEMM keeps winning at every larger measured M
        first = None
        for m in reversed(ms):
            if m in wins:
                first = m
            else:
                break
        crossover[shape] = first
    targets = []
    for m, ref in GEMM_ONLY_TARGETS_US.items():
        whole = us("dsv3-ep8", m, "deep_gemm")
        only = us("dsv3-ep8", m, "deep_gemm_gemm_only")
        targets.append(dict(
            shape="dsv3-ep8", M=m, reference_gemm_only_us=ref, measured_gemm_only_us=only, whole_call_us=whole,
            whole_within_1_15x_of_reference=None if whole is None else whole <= WHOLE_CALL_SLACK * ref,
            whole_within_1_15x_of_measured_gemm_only=None if whole is None or only is None else whole <= WHOLE_CALL_SLACK * only,
        ))
    for m in (64, 256):
        masked = us("dsv3-ep8", m, "batched_deep_gemm")
        targets.append(dict(shape="dsv3-ep8", M=m, backend="batched_deep_gemm", us=masked,
                            reference_range_us=MASKED_DECODE_TARGET_US,
                            within_reference=None if masked is None else masked <= MASKED_DECODE_TARGET_US[1]))
    known = [v for v in crossover.values() if v is not None]
    return dict(crossover=crossover, suggested_DEEPGEMM_MIN_TOKENS=min(known) if known else None, targets=targets)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(DEFAULT_SHAPES))
    p.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    p.add_argument("--backends", nargs="+", choices=list(BACKENDS) + ["all"], default=list(DEFAULT_BACKENDS),
                   help="rows to time per (shape, M); 'all' adds the masked and Triton rows")
    p.add_argument("--breakdown", action="store_true", help="also time each stage of DeepGemmExperts.apply")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="bench_deepgemm.json")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()
    if "all" in args.backends:
        args.backends = list(BACKENDS)
    if not torch.cuda.is_available():
        print("bench_deepgemm.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from moe_plugin.experts.deep_gemm import deep_gemm_api

    api = deep_gemm_api()
    triton_cls = None
    if {"triton_fp8", "triton_bf16"} & set(args.backends):
        try:
            from moe_plugin.experts.triton import TritonExperts as triton_cls
        except ImportError as exc:
            print(f"Triton experts unavailable ({exc}); timing DeepGEMM only", file=sys.stderr)
    bench = Bench(args)
    for name in args.shapes:
        bench_shape(bench, name, args.tokens, triton_cls)
        torch.cuda.empty_cache()  # the shape's weights are gone with its frame
        write_report(args, api, bench)  # partial results survive a later timeout
    report = write_report(args, api, bench)
    print(json.dumps({k: report[k] for k in ("crossover", "suggested_DEEPGEMM_MIN_TOKENS", "targets")}, indent=1))
    print(breakdown_table(bench.rows))
    return 0


def breakdown_table(rows: list[dict]) -> str:
    """One line per (shape, M): whole calls, GEMM-only, each stage and their sums, in microseconds."""
    cols = ["deep_gemm", "deep_gemm_prequant", "deep_gemm_two_step", "deep_gemm_gemm_only"] + [f"stage:{s}" for s in STAGES]
    keys = sorted({(r["shape"], r["M"]) for r in rows})
    table = {(r["shape"], r["M"], r["backend"]): r.get("us") for r in rows}
    short = ["whole", "whole_preq", "whole_2step", "gemm_only", "prep_q", "scatter", "scatter_q", "gemm1",
             "aq_2step", "aq_fused", "gemm2", "gather", "sum_fused", "sum_2step"]
    lines = ["shape            M      " + " ".join(f"{c:>11}" for c in short)]
    for shape, m in keys:
        vals = [table.get((shape, m, c)) for c in cols]
        st = dict(zip(STAGES, vals[4:]))
        # comparable with the whole call: the quantizing scatter, or prepare's quantization and the FP8 scatter
        common = [st[s] for s in ("scatter_quant", "gemm1", "gemm2", "gather")]
        fused = None if None in common or st["act_quant_fused"] is None else sum(common) + st["act_quant_fused"]
        two = None if None in common or st["act_quant_two_step"] is None else sum(common) + st["act_quant_two_step"]
        cells = vals + [fused, two]
        lines.append(f"{shape:16} {m:<6} " + " ".join(f"{'-' if v is None else round(v, 1):>11}" for v in cells))
    return "\n".join(lines)


def write_report(args, api, bench: Bench) -> dict:
    report = dict(
        device=torch.cuda.get_device_name(),
        capability=list(torch.cuda.get_device_capability()),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        deep_gemm=api.version,
        python=platform.python_version(),
        iters=args.iters,
        results=bench.rows,
        **summarize(bench.rows),
    )
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    sys.exit(main())
