"""One rank of the EP integration tests: runs every case of a suite and writes ``rank{R}.json``.

Launched once per world size by ``test_ep_all2all.py`` (plain subprocesses with RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT, or torchrun for the multi-GPU run) so a whole suite costs one process-group
setup. Every case builds its inputs from seeds every rank knows, runs the EP kernel on this rank's tokens
and compares against (a) the naive float64 loop of tests/naive.py over the *full* weights and (b) the
single-process ``TorchExperts`` over the full weights. A case that raises is recorded as failed with its
traceback; the pytest side asserts on the records.

Usage: ``python tests/ep/ep_worker.py --suite {main,stall_barrier,stall_pg,stall_call,dead_rank} --out DIR
[--backend gloo|nccl] [--device cpu|cuda] [--timeout S] [--call-timeout S]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/ for naive.py

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import naive  # noqa: E402
from moe_plugin import BackendUnavailableError, FusedMoE, ModularKernel, MoEConfig, ParallelConfig, QuantConfig  # noqa: E402
from moe_plugin.config import QuantScheme  # noqa: E402
from moe_plugin.distributed import (  # noqa: E402
    EPGroup,
    build_expert_map,
    expert_owner,
    init_distributed,
    local_expert_ids,
)
from moe_plugin.experts.torch_ref import BatchedTorchExperts, TorchExperts  # noqa: E402
from moe_plugin.modular import ExpertWeights  # noqa: E402
from moe_plugin.ops.quant import quantize_block_weight  # noqa: E402
from moe_plugin.prepare_finalize.all2all import (  # noqa: E402
    AllToAllPrepareAndFinalize,
    BatchedAllToAllPrepareAndFinalize,
    EPCommunicationError,
)
from moe_plugin.prepare_finalize.local import LocalPrepareAndFinalize  # noqa: E402

FP8 = torch.float8_e4m3fn
# Tolerances of the relative L2 error. "naive": against the float64 loop (bounded by the model dtype's
# rounding); "torch": against the single-process TorchExperts (the same arithmetic, summed in another order,
# and for low precision the per-rank partial sums are rounded once more before the origin adds them).
TOL = {
    "fp32": {"naive": 1e-5, "torch": 1e-5},
    "bf16": {"naive": 2e-2, "torch": 1.5e-2},
    "fp8": {"naive": 8e-2, "torch": 2e-2},
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double().cpu()
    out = out.double().cpu()
    if ref.numel() == 0:
        return 0.0 if out.numel() == 0 else float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


class Ctx:
    def __init__(self, ep: EPGroup, device: torch.device):
        self.ep = ep
        self.rank = ep.rank
        self.world = ep.world_size
        self.device = device


# ---- inputs every rank can rebuild -------------------------------------------------------------------------
def make_weights(e, k, n, dtype, quant: QuantConfig, seed=1234):
    """Full weights ``w1 [E, 2N, K]``, ``w2 [E, K, N]`` (+ scales for FP8) and their float form for naive."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(e, 2 * n, k, generator=g) * k**-0.5
    w2 = torch.randn(e, k, n, generator=g) * n**-0.5
    if not quant.is_quantized:
        w1, w2 = w1.to(dtype), w2.to(dtype)
        return dict(w1=w1, w2=w2, w1_scale=None, w2_scale=None)
    if quant.block_shape is not None:
        q1, s1 = quantize_block_weight(w1, quant.block_shape)
        q2, s2 = quantize_block_weight(w2, quant.block_shape)
        return dict(w1=q1, w2=q2, w1_scale=s1, w2_scale=s2)
    if quant.per_act_token:  # per output channel
        s1 = w1.abs().amax(-1, keepdim=True) / 448.0
        s2 = w2.abs().amax(-1, keepdim=True) / 448.0
    else:  # per tensor (one scale per expert)
        s1 = (w1.abs().amax((-2, -1)) / 448.0).view(e, 1, 1)
        s2 = (w2.abs().amax((-2, -1)) / 448.0).view(e, 1, 1)
    q1, q2 = (w1 / s1).to(FP8), (w2 / s2).to(FP8)
    if not quant.per_act_token:
        s1, s2 = s1.view(e), s2.view(e)
    return dict(w1=q1, w2=q2, w1_scale=s1.float(), w2_scale=s2.float())


def dequant_weights(w, quant):
    """Float weights equal to what the FP8 experts compute with (per-channel / per-tensor)."""
    if not quant.is_quantized:
        return w["w1"], w["w2"]
    e = w["w1"].shape[0]
    s1, s2 = w["w1_scale"], w["w2_scale"]
    if not quant.per_act_token:
        s1, s2 = s1.view(e, 1, 1), s2.view(e, 1, 1)
    return w["w1"].float() * s1, w["w2"].float() * s2


def make_tokens(rank, m, k, e, top_k, dtype, seed, allowed=None):
    """Rank ``rank``'s tokens and routing (distinct experts per token, drawn from ``allowed``)."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    x = torch.randn(m, k, generator=g).to(dtype)
    pool = torch.arange(e) if allowed is None else torch.tensor(allowed)
    ids = torch.stack([pool[torch.randperm(pool.numel(), generator=g)[:top_k]] for _ in range(m)]) if m else torch.empty(0, top_k, dtype=torch.long)
    w = torch.rand(m, top_k, generator=g) + 0.1
    return x, w.float(), ids.to(torch.int32)


def local_weights(w, cfg: MoEConfig, device):
    own = torch.tensor(local_expert_ids(cfg.num_experts, cfg.parallel))
    sl = lambda t: None if t is None else t[own].contiguous().to(device)  # noqa: E731
    return ExpertWeights(sl(w["w1"]), sl(w["w2"]), sl(w["w1_scale"]), sl(w["w2_scale"]))


def build_kernel(ctx: Ctx, cfg: MoEConfig, batched: bool, **kw) -> ModularKernel:
    if batched:
        pf = BatchedAllToAllPrepareAndFinalize.from_config(cfg, ctx.ep.group, **kw)
        return ModularKernel(pf, BatchedTorchExperts(cfg))
    pf = AllToAllPrepareAndFinalize.from_config(cfg, ctx.ep.group, **kw)
    return ModularKernel(pf, TorchExperts(cfg))


def references(x, tw, ids, w, cfg: MoEConfig, apply_on_input=False):
    """(naive float64 loop, single-process TorchExperts) over the full weights, on CPU."""
    q = cfg.quant
    if q.is_quantized and q.block_shape is not None:
        ref_naive = naive.moe(x, w["w1"], w["w2"], tw, ids, cfg.activation, w1_scale=w["w1_scale"],
                              w2_scale=w["w2_scale"], block=q.block_shape, apply_router_weight_on_input=apply_on_input)
    else:
        w1f, w2f = dequant_weights(w, q)
        ref_naive = naive.moe(x, w1f, w2f, tw, ids, cfg.activation, apply_router_weight_on_input=apply_on_input)
    full = MoEConfig(cfg.num_experts, cfg.top_k, cfg.hidden_size, cfg.intermediate_size, dtype=cfg.dtype,
                     activation=cfg.activation, quant=q)
    single = ModularKernel(LocalPrepareAndFinalize(q), TorchExperts(full))
    ref_torch = single(x, ExpertWeights(w["w1"], w["w2"], w["w1_scale"], w["w2_scale"]), tw, ids,
                       apply_router_weight_on_input=apply_on_input)
    return ref_naive, ref_torch


def run_ep_case(ctx: Ctx, *, dtype="fp32", quant=None, batched=False, m=12, e=8, top_k=2, k=32, n=16,
                placement="contiguous", ms=None, allowed=None, chunk_size=32768, max_num_tokens=64,
                apply_on_input=False, seed=0, kernel_check=None):
    """Run one EP configuration on this rank's tokens; return the errors against both references."""
    quant = quant or QuantConfig()
    tdt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    cfg = MoEConfig(e, top_k, k, n, dtype=tdt, quant=quant, parallel=ParallelConfig(ctx.world, ctx.rank, placement),
                    chunk_size=chunk_size, max_num_tokens=max_num_tokens)
    w = make_weights(e, k, n, tdt, quant, seed=seed + 7)
    m_here = ms[ctx.rank % len(ms)] if ms is not None else m
    x, tw, ids = make_tokens(ctx.rank, m_here, k, e, top_k, tdt, seed, allowed)
    kernel = build_kernel(ctx, cfg, batched)
    emap = build_expert_map(e, cfg.parallel, ctx.device)
    out = kernel(x.to(ctx.device), local_weights(w, cfg, ctx.device), tw.to(ctx.device), ids.to(ctx.device),
                 expert_map=emap, apply_router_weight_on_input=apply_on_input)
    assert out.shape == x.shape and out.dtype == tdt, (out.shape, out.dtype)
    if kernel_check is not None:
        kernel_check(kernel, x, tw, ids)
    ref_naive, ref_torch = references(x, tw, ids, w, cfg, apply_on_input)
    key = "fp8" if quant.is_quantized else dtype
    return {
        "m": m_here,
        "err_naive": rel_err(out, ref_naive),
        "err_torch": rel_err(out, ref_torch),
        "tol_naive": TOL[key]["naive"],
        "tol_torch": TOL[key]["torch"],
    }


# ---- cases ---------------------------------------------------------------------------------------------
def cases(ctx: Ctx) -> dict:
    w = ctx.world
    e = 4 * max(w, 2)
    fp8 = QuantConfig.fp8_block()
    c: dict = {}
    for fmt, batched in (("std", False), ("bat", True)):
        c[f"{fmt}_fp32"] = lambda b=batched: run_ep_case(ctx, batched=b, e=e)
        c[f"{fmt}_bf16"] = lambda b=batched: run_ep_case(ctx, batched=b, e=e, dtype="bf16", seed=1)
        c[f"{fmt}_fp8_block"] = lambda b=batched: run_ep_case(
            ctx, batched=b, e=e, dtype="bf16", quant=fp8, k=256, n=128, m=6, seed=2)
        # Skewed: every token of every rank goes to rank 0's experts.
        rank0 = local_expert_ids(e, ParallelConfig(w, 0))
        c[f"{fmt}_skew_to_rank0"] = lambda b=batched, a=rank0: run_ep_case(ctx, batched=b, e=e, allowed=a, seed=3)
        # Rank 1 (or the only rank) has no tokens at all but must still take part.
        c[f"{fmt}_rank_with_no_tokens"] = lambda b=batched: run_ep_case(
            ctx, batched=b, e=e, ms=[9, 0, 5, 3], seed=4)
        c[f"{fmt}_round_robin"] = lambda b=batched: run_ep_case(ctx, batched=b, e=e, placement="round_robin", seed=5)
        # FP8 scales travel with the rows: a rank with no tokens still sends a (zero-row) scale field.
        c[f"{fmt}_fp8_rank_with_no_tokens"] = lambda b=batched: run_ep_case(
            ctx, batched=b, e=e, dtype="bf16", quant=fp8, k=256, n=128, ms=[6, 0, 5, 3], seed=10)
    # Different chunk counts per rank: agree_num_chunks must keep the collectives in step.
    c["std_uneven_chunks"] = lambda: run_ep_case(ctx, e=e, ms=[13, 2, 0, 7], chunk_size=4, seed=6)
    c["bat_uneven_chunks"] = lambda: run_ep_case(ctx, batched=True, e=e, ms=[11, 3, 0, 9], max_num_tokens=4, seed=7)
    c["std_router_weight_on_input"] = lambda: run_ep_case(ctx, e=e, top_k=1, apply_on_input=True, seed=8)
    c["bat_router_weight_on_input"] = lambda: run_ep_case(ctx, batched=True, e=e, top_k=1, apply_on_input=True, seed=8)
    c["std_fp8_per_token"] = lambda: run_ep_case(
        ctx, e=e, dtype="bf16", quant=QuantConfig(QuantScheme.FP8_W8A8, per_act_token=True), seed=9)
    c["std_fp8_per_token_uneven_chunks"] = lambda: run_ep_case(
        ctx, e=e, dtype="bf16", quant=QuantConfig(QuantScheme.FP8_W8A8, per_act_token=True), ms=[6, 2, 0, 5],
        chunk_size=4, seed=11)
    c["std_fp8_per_tensor_static"] = lambda: case_fp8_per_tensor(ctx, e, static=True)
    c["std_fp8_per_tensor_dynamic"] = lambda: case_fp8_per_tensor(ctx, e, static=False)
    c["stats_and_dedup"] = lambda: case_stats(ctx, e)
    c["layer_oracle_all2all"] = lambda: case_layer(ctx, e, None)
    c["layer_forced_batched_all2all"] = lambda: case_layer(ctx, e, "batched_all2all")
    c["shared_experts_overlap"] = lambda: case_shared(ctx, e)
    c["subgroup_split_world"] = lambda: case_subgroup(ctx, e)
    c["config_mismatch_detected"] = lambda: case_config_mismatch(ctx, e)
    c["ep_rank_mismatch_detected"] = lambda: case_rank_mismatch(ctx, e)
    c["bad_inputs_rejected"] = lambda: case_bad_inputs(ctx, e)
    c["bat_duplicate_ids_rejected_by_sender"] = lambda: case_duplicate_ids(ctx, e)
    c["one_rank_bad_ids_every_rank_raises"] = lambda: case_one_rank_rejects_its_inputs(ctx, e, "ids")
    c["one_rank_bad_dtype_every_rank_raises"] = lambda: case_one_rank_rejects_its_inputs(ctx, e, "dtype")
    return c


def case_fp8_per_tensor(ctx: Ctx, e: int, static: bool):
    """Per-tensor FP8: static scale quantizes before dispatch; dynamic is quantized by the receiver over
    the rows it got, so only the naive (dequantized-weight, unquantized-activation) bound applies."""
    quant = QuantConfig(QuantScheme.FP8_W8A8)
    k, n, top_k = 32, 16, 2
    cfg = MoEConfig(e, top_k, k, n, dtype=torch.bfloat16, quant=quant, parallel=ParallelConfig(ctx.world, ctx.rank))
    w = make_weights(e, k, n, torch.bfloat16, quant, seed=11)
    x, tw, ids = make_tokens(ctx.rank, 10, k, e, top_k, torch.bfloat16, 11)
    ew = local_weights(w, cfg, ctx.device)
    if static:
        ew.a1_scale = torch.tensor([4.0 / 448.0], device=ctx.device)
    kernel = build_kernel(ctx, cfg, False)
    out = kernel(x.to(ctx.device), ew, tw.to(ctx.device), ids.to(ctx.device),
                 expert_map=build_expert_map(e, cfg.parallel, ctx.device))
    w1f, w2f = dequant_weights(w, quant)
    err = rel_err(out, naive.moe(x, w1f, w2f, tw, ids))
    return {"err_naive": err, "tol_naive": 8e-2}


def case_stats(ctx: Ctx, e: int):
    """ExpertLoadStats against counts computed here from every rank's routing (all rebuilt from seeds),
    and the travel-once rule: a token routed to two experts of one rank is sent once."""
    w, r = ctx.world, ctx.rank
    k, top_k, seed = 32, 2, 21
    cfg = MoEConfig(e, top_k, k, 16, dtype=torch.bfloat16, parallel=ParallelConfig(w, r))
    weights = make_weights(e, k, 16, torch.bfloat16, cfg.quant, seed=seed)
    owner = expert_owner(e, w, cfg.parallel.placement)
    per_rank_ids = []
    for src in range(w):
        # Half of every rank's tokens pick two experts of one rank (the "next" rank), half pick freely.
        x, tw, ids = make_tokens(src, 8, k, e, top_k, torch.bfloat16, seed)
        same = local_expert_ids(e, ParallelConfig(w, (src + 1) % w))
        ids[:4] = torch.tensor(same[:2], dtype=torch.int32)
        per_rank_ids.append((x, tw, ids))
    x, tw, ids = per_rank_ids[r]
    kernel = build_kernel(ctx, cfg, False)
    out = kernel(x.to(ctx.device), local_weights(weights, cfg, ctx.device), tw.to(ctx.device), ids.to(ctx.device),
                 expert_map=build_expert_map(e, cfg.parallel, ctx.device))
    st = kernel.prepare_finalize.stats
    want_per_expert = torch.bincount(ids.long().flatten(), minlength=e)
    want_sent = torch.zeros(w, dtype=torch.long)
    for t in range(ids.shape[0]):
        for dst in set(owner[ids[t].long()].tolist()):
            want_sent[dst] += 1
    want_recv = torch.zeros(w, dtype=torch.long)
    all_per_expert = torch.zeros(e, dtype=torch.long)
    for src, (_, _, sids) in enumerate(per_rank_ids):
        all_per_expert += torch.bincount(sids.long().flatten(), minlength=e)
        want_recv[src] = sum(1 for t in range(sids.shape[0]) if r in set(owner[sids[t].long()].tolist()))
    mine = torch.tensor(local_expert_ids(e, cfg.parallel))
    row_bytes = 4 * top_k + 4 * top_k + 2 * k
    problems = []

    def check(name, got, want):
        if not torch.equal(torch.as_tensor(got).long(), torch.as_tensor(want).long()):
            problems.append(f"{name}: got {torch.as_tensor(got).tolist()} want {torch.as_tensor(want).tolist()}")

    check("tokens_per_expert", st.last_tokens_per_expert, want_per_expert)
    check("tokens_sent_per_rank", st.last_tokens_sent_per_rank, want_sent)
    check("tokens_received_per_rank", st.last_tokens_received_per_rank, want_recv)
    check("local_expert_load", st.last_local_expert_load, all_per_expert[mine])
    check("dispatch_bytes_sent", st.last_bytes["dispatch_bytes_sent"], int(want_sent.sum()) * row_bytes)
    check("dispatch_bytes_received", st.last_bytes["dispatch_bytes_received"], int(want_recv.sum()) * row_bytes)
    check("combine_bytes_sent", st.last_bytes["combine_bytes_sent"], int(want_recv.sum()) * k * 2)
    check("global_tokens_per_expert", st.global_tokens_per_expert(ctx.ep), all_per_expert)
    per_rank_load = torch.zeros(w).index_add_(0, owner, all_per_expert.float())
    want_imb = (per_rank_load.max() / per_rank_load.mean()).item()
    if abs(st.imbalance(ctx.ep) - want_imb) > 1e-9:
        problems.append(f"imbalance {st.imbalance(ctx.ep)} != {want_imb}")
    if st.steps != 1 or st.as_dict()["steps"] != 1:
        problems.append(f"steps {st.steps}")
    # A token whose two experts live on one rank travels once: rows sent < slots whenever w > 1.
    if w > 1 and not int(st.last_tokens_sent_per_rank.sum()) < 2 * ids.shape[0]:
        problems.append("no deduplication of tokens routed twice to one rank")
    st.reset()
    if st.steps != 0 or int(st.total_tokens_per_expert.sum()) != 0:
        problems.append("reset did not zero the counters")
    err = rel_err(out, naive.moe(x, weights["w1"], weights["w2"], tw, ids))
    return {"err_naive": err, "tol_naive": 2e-2, "problems": problems}


def case_layer(ctx: Ctx, e: int, forced: str | None):
    """FusedMoE picks the all-to-all backend by itself under EP and loads its slice of stacked weights."""
    k, n, top_k = 32, 16, 2
    cfg = MoEConfig(e, top_k, k, n, dtype=torch.float32, parallel=ParallelConfig(ctx.world, ctx.rank))
    if ctx.world == 1 and forced is not None:  # a forced EP backend with one rank must say why it cannot run
        return _expect_error(lambda: FusedMoE(cfg, prepare_finalize_backend=forced), BackendUnavailableError,
                             "ep_size=1")
    w = make_weights(e, k, n, torch.float32, cfg.quant, seed=31)
    layer = FusedMoE(cfg, with_gate=True, device=ctx.device, prepare_finalize_backend=forced, group=ctx.ep.group)
    g = torch.Generator().manual_seed(31)
    gate = torch.randn(e, k, generator=g)
    layer.load_weights({"experts.w13_weight": w["w1"], "experts.w2_weight": w["w2"], "gate.weight": gate})
    x = torch.randn(7 + ctx.rank, k, generator=torch.Generator().manual_seed(40 + ctx.rank))
    out = layer(x.to(ctx.device))
    tw, ti = naive.topk_softmax(x @ gate.t(), top_k, True)
    want = forced or ("all2all" if ctx.world > 1 else "local")
    problems = [] if layer.kernel.describe().startswith(want + " ") else [f"kernel {layer.kernel.describe()}"]
    return {"err_naive": rel_err(out, naive.moe(x, w["w1"], w["w2"], tw, ti)), "tol_naive": 1e-5,
            "problems": problems}


def case_shared(ctx: Ctx, e: int):
    """Shared experts run while the dispatch is in flight and are added once."""
    k, n, top_k = 32, 16, 2
    cfg = MoEConfig(e, top_k, k, n, dtype=torch.float32, parallel=ParallelConfig(ctx.world, ctx.rank))
    w = make_weights(e, k, n, torch.float32, cfg.quant, seed=41)
    shared = torch.nn.Linear(k, k, bias=False)
    with torch.no_grad():
        shared.weight.copy_(torch.randn(k, k, generator=torch.Generator().manual_seed(41)) * k**-0.5)
    shared = shared.to(ctx.device)
    pf = AllToAllPrepareAndFinalize.from_config(cfg, ctx.ep.group)
    kernel = ModularKernel(pf, TorchExperts(cfg), shared_experts=shared, chunk_size=3)
    x, tw, ids = make_tokens(ctx.rank, 8, k, e, top_k, torch.float32, 41)
    with torch.no_grad():
        out = kernel(x.to(ctx.device), local_weights(w, cfg, ctx.device), tw.to(ctx.device), ids.to(ctx.device),
                     expert_map=build_expert_map(e, cfg.parallel, ctx.device))
        ref = naive.moe(x, w["w1"], w["w2"], tw, ids) + (x.double() @ shared.weight.detach().cpu().double().t())
    return {"err_naive": rel_err(out, ref), "tol_naive": 1e-5}


def case_subgroup(ctx: Ctx, e: int):
    """EP over sub-groups of the world (``EPGroup.split_world``): pairs of ranks, each an EP group of 2."""
    size = 2 if ctx.world % 2 == 0 else 1
    sub = EPGroup.split_world(size)
    sctx = Ctx(sub, ctx.device)
    problems = [] if (sub.world_size, sub.rank) == (size, ctx.rank % size) else [f"sub-group {sub.describe()}"]
    rec = run_ep_case(sctx, e=e, seed=50)
    layer = case_layer(sctx, e, None)
    problems += layer["problems"]
    if not layer["err_naive"] <= layer["tol_naive"]:
        problems.append(f"layer on the sub-group: error {layer['err_naive']}")
    return {**rec, "problems": problems}


def _expect_error(fn, exc_type, needle):
    try:
        fn()
    except exc_type as exc:
        msg = str(exc)
        return {"problems": [] if needle in msg else [f"message lacks {needle!r}: {msg}"], "message": msg}
    return {"problems": [f"no {exc_type.__name__} raised"]}


def case_config_mismatch(ctx: Ctx, e: int):
    hidden = 32 if ctx.rank != ctx.world - 1 or ctx.world == 1 else 64
    cfg = MoEConfig(e, 2, hidden, 16, dtype=torch.float32, parallel=ParallelConfig(ctx.world, ctx.rank))
    if ctx.world == 1:  # nothing to disagree with; the backend kind is part of the fingerprint
        return {"problems": []}
    out = _expect_error(lambda: AllToAllPrepareAndFinalize.from_config(cfg, ctx.ep.group), ValueError,
                        "different MoE configs")
    if "hidden=64" not in out.get("message", "") or "hidden=32" not in out.get("message", ""):
        out["problems"].append("the error does not show both configs")
    return out


def case_rank_mismatch(ctx: Ctx, e: int):
    if ctx.world == 1:
        return {"problems": []}
    swapped = {0: 1, 1: 0}.get(ctx.rank, ctx.rank)
    cfg = MoEConfig(e, 2, 32, 16, dtype=torch.float32, parallel=ParallelConfig(ctx.world, swapped))
    return _expect_error(lambda: AllToAllPrepareAndFinalize.from_config(cfg, ctx.ep.group), ValueError,
                         "group rank 0 has ep_rank=1")


def case_bad_inputs(ctx: Ctx, e: int):
    cfg = MoEConfig(e, 2, 32, 16, dtype=torch.float32, parallel=ParallelConfig(ctx.world, ctx.rank))
    pf = AllToAllPrepareAndFinalize.from_config(cfg, ctx.ep.group)
    d = ctx.device
    x = torch.randn(4, 32, device=d)
    tw = torch.rand(4, 2, device=d)
    ids = torch.zeros(4, 2, dtype=torch.int32, device=d)
    kw = dict(num_experts=e, expert_map=None, apply_router_weight_on_input=False, a1_scale=None)
    problems = []
    for name, fn, exc, needle in (
        ("dtype", lambda: pf.prepare(x.double(), tw, ids, **kw), TypeError, "config dtype"),
        ("hidden", lambda: pf.prepare(x[:, :16], tw, ids, **kw), ValueError, "hidden_size=32"),
        ("top_k", lambda: pf.prepare(x, tw[:, :1], ids[:, :1], **kw), ValueError, "[M, top_k]"),
        ("range", lambda: pf.prepare(x, tw, ids + e, **kw), ValueError, "topk_ids values"),
        ("map", lambda: pf.prepare(x, tw, ids, **{**kw, "expert_map": torch.zeros(e, dtype=torch.int32, device=d)}),
         ValueError, "expert_map does not match"),
    ):
        problems += [f"{name}: {p}" for p in _expect_error(fn, exc, needle)["problems"]]
    return {"problems": problems}


def case_one_rank_rejects_its_inputs(ctx: Ctx, e: int, what: str):
    """Bad inputs on the last rank only, through ModularKernel: every rank raises at once (the bad one its
    own error, the others that a peer rejected) instead of waiting in a collective, and the group still
    works for the next call."""
    cfg = MoEConfig(e, 2, 32, 16, dtype=torch.float32, parallel=ParallelConfig(ctx.world, ctx.rank))
    kernel = build_kernel(ctx, cfg, batched=False)
    w = make_weights(e, 32, 16, torch.float32, QuantConfig(), seed=12)
    lw = local_weights(w, cfg, ctx.device)
    emap = build_expert_map(e, cfg.parallel, ctx.device)
    x, tw, ids = (t.to(ctx.device) for t in make_tokens(ctx.rank, 5, 32, e, 2, torch.float32, 12, None))
    bad = ctx.rank == ctx.world - 1
    if bad and what == "ids":
        ids = ids.clone()
        ids[2, 1] = e + 3
    elif bad:  # hidden_states of another dtype: the all-to-all refuses it in its own check
        x = x.double()
    needle = ("topk_ids" if what == "ids" else "dtype") if bad else "another rank of the expert-parallel group"
    exc = ValueError if (bad and what == "ids") or not bad else TypeError
    out = _expect_error(lambda: kernel(x, lw, tw, ids, expert_map=emap), exc, needle)
    if ctx.world == 1 and not bad:
        out = {"problems": []}
    x, tw, ids = (t.to(ctx.device) for t in make_tokens(ctx.rank, 5, 32, e, 2, torch.float32, 13, None))
    good = kernel(x, lw, tw, ids, expert_map=emap)  # the group still works
    ref_naive, _ = references(x.cpu(), tw.cpu(), ids.cpu(), w, cfg)
    if rel_err(good, ref_naive) > TOL["fp32"]["naive"]:
        out["problems"].append(f"call after the rejection is wrong: {rel_err(good, ref_naive)}")
    return out


def case_duplicate_ids(ctx: Ctx, e: int):
    """A token naming an expert twice is rejected by the rank that sent it, before any collective (so no
    peer is left waiting in the combine); the group stays usable afterwards."""
    cfg = MoEConfig(e, 3, 32, 16, dtype=torch.float32, parallel=ParallelConfig(ctx.world, ctx.rank), max_num_tokens=4)
    pf = BatchedAllToAllPrepareAndFinalize.from_config(cfg, ctx.ep.group)
    d = ctx.device
    x = torch.randn(4, 32, device=d)
    ids = torch.tensor([[0, 1, 2]] * 3 + [[1, 1, 0]], dtype=torch.int32, device=d)
    kw = dict(num_experts=e, expert_map=None, apply_router_weight_on_input=False, a1_scale=None)
    out = _expect_error(lambda: pf.prepare(x, torch.rand(4, 3, device=d), ids, **kw), ValueError,
                        "repeats an expert")
    ctx.ep.barrier(30.0)  # every rank raised locally: the group still works
    return out


# ---- failure suites (one scenario per launch: a failed collective leaves the group unusable) ------------
STALL_SECONDS = 60.0  # a stalled rank sleeps this long; the launcher kills it once rank 0 has reported


def suite_stall_barrier(ctx: Ctx, timeout: float) -> dict:
    if ctx.rank == 1:
        time.sleep(STALL_SECONDS)
        return {}
    start = time.monotonic()
    try:
        ctx.ep.barrier(timeout=timeout)
    except EPCommunicationError as exc:
        return {"stall_barrier": {"elapsed": time.monotonic() - start, "message": str(exc)}}
    except Exception as exc:
        return {"stall_barrier": {"problems": [f"{type(exc).__name__} instead of EPCommunicationError: {exc}"]}}
    return {"stall_barrier": {"problems": ["barrier passed with a stalled rank"]}}


def _forward_once(ctx: Ctx, e: int, **kw):
    cfg = MoEConfig(e, 2, 32, 16, dtype=torch.float32, parallel=ParallelConfig(ctx.world, ctx.rank))
    kernel = build_kernel(ctx, cfg, False, **kw)
    w = make_weights(e, 32, 16, torch.float32, cfg.quant)
    x, tw, ids = make_tokens(ctx.rank, 5, 32, e, 2, torch.float32, 0)
    x, tw, ids = x.to(ctx.device), tw.to(ctx.device), ids.to(ctx.device)
    run = lambda: kernel(x, local_weights(w, cfg, ctx.device), tw, ids,  # noqa: E731
                         expert_map=build_expert_map(e, cfg.parallel, ctx.device))
    run()  # one healthy step first
    return run


def suite_failure(ctx: Ctx, mode: str, call_timeout: float | None) -> dict:
    """``stall_pg`` / ``stall_call``: rank 1 stops answering; the others must fail after the process-group
    timeout / the backend's own ``timeout``. ``dead_rank``: rank 1 exits; the others must fail at once."""
    e = 4 * ctx.world
    run = _forward_once(ctx, e, **({"timeout": call_timeout} if call_timeout else {}))
    if ctx.rank == 1:
        if mode == "dead_rank":
            os._exit(3)
        time.sleep(STALL_SECONDS)
        return {}
    start = time.monotonic()
    try:
        run()
    except EPCommunicationError as exc:
        return {mode: {"elapsed": time.monotonic() - start, "message": str(exc)}}
    except Exception as exc:  # the wrong exception type is a failure the test reports
        return {mode: {"problems": [f"{type(exc).__name__} instead of EPCommunicationError: {exc}"]}}
    return {mode: {"problems": ["the step completed although rank 1 is gone"]}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--suite", default="main", choices=["main", "stall_barrier", "stall_pg", "stall_call", "dead_rank"])
    p.add_argument("--out", required=True)
    p.add_argument("--backend", default="gloo")
    p.add_argument("--device", default="cpu")
    p.add_argument("--timeout", type=float, default=120.0, help="process-group timeout, seconds")
    p.add_argument("--call-timeout", type=float, default=0.0, help="the backend's own timeout, seconds (0: none)")
    p.add_argument("--only", default="", help="comma-separated case names (main suite)")
    args = p.parse_args()
    torch.set_num_threads(1)
    ep = init_distributed(args.backend, timeout=args.timeout)
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    ctx = Ctx(ep, device)
    results: dict = {}
    if args.suite == "main":
        only = {s for s in args.only.split(",") if s}
        for name, fn in cases(ctx).items():
            if only and name not in only:
                continue
            start = time.monotonic()
            try:
                results[name] = fn()
            except Exception:
                results[name] = {"problems": [traceback.format_exc()]}
            results[name]["seconds"] = time.monotonic() - start
    elif args.suite == "stall_barrier":
        results = suite_stall_barrier(ctx, args.call_timeout or args.timeout)
    else:
        results = suite_failure(ctx, args.suite, args.call_timeout or None)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"rank{ep.rank}.json"), "w") as f:
        json.dump(results, f, indent=1)
    sys.stdout.flush()
    if args.suite == "main":
        dist.barrier()
        dist.destroy_process_group()
    else:
        os._exit(0)  # peers may be gone: skip the process-group teardown


if __name__ == "__main__":
    main()
