#!/usr/bin/env python3
"""Search Triton experts launch configs on this GPU and write them where ``ops.launch_config`` looks.

For every (shape, dtype, M) not yet in the output JSON it times the two GEMMs separately (CUDA-graph
replays, median) over a candidate set chosen by the rows each expert receives, per block_m and routing
(slot / sorted), then keeps the combination with the least align + GEMM1 + GEMM2 (+ split-K reduction)
time, and checks the winner's output against the heuristic config's before writing it. The shape
heuristic is always the first candidate, so a tuned entry is never slower than the default it replaces.

Unquantized bf16 / fp16 on a TMA-capable GPU (sm90+): the winner, and the big-tile heuristic config, are
then tried whole (align + both GEMMs + reduction in one graph) on the TMA path (``tma`` = ``"weights"`` /
``"all"``, persistent or not, ``ops.tma_gemm``) in two interleaved rounds (best of the two per variant,
since long compute-bound replays drift with the clocks); a TMA variant replaces the pointer-kernel winner
when it is faster. ``--tma-only`` runs just that step for M values already in the files, starting from
their entries.

Resumable: entries already in the file are skipped (``--force`` redoes them); the file is rewritten after
every finished M. ``--budget-seconds`` bounds the whole run: the time is spread over the pending jobs and
each job stops trying candidates when its share is spent (the heuristic is always measured).

Output files are named like ``E=128,N=768,device_name=NVIDIA_H100_80GB_HBM3,dtype=bf16.json`` and map M to
a config; point ``MOE_PLUGIN_TRITON_CONFIG_DIR`` at ``--out-dir`` to use them (or write into
``moe_plugin/ops/configs`` to ship them).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_experts import DTYPES, M_VALUES, SHAPES, graph_times_us, make_problem, make_routing  # noqa: E402


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, dynamic_ncols=True, file=sys.stdout)
    except ImportError:
        return _PlainProgress(total, desc)


class _PlainProgress:
    def __init__(self, total: int, desc: str):
        self.total, self.n, self.desc, self.t0 = total, 0, desc, time.monotonic()
        self.postfix = ""

    def update(self, k: int = 1) -> None:
        self.n += k
        print(f"[{self.desc}] {self.n}/{self.total} ({time.monotonic() - self.t0:.0f}s) {self.postfix}", flush=True)

    def set_postfix_str(self, s: str) -> None:
        self.postfix = s

    def write(self, s: str) -> None:
        print(s, flush=True)

    def close(self) -> None:
        pass


def time_graph_us(fn, replays: int) -> float:
    """Median CUDA-graph replay time of ``fn`` in microseconds (no L2 flush between replays)."""
    return statistics.median(graph_times_us(fn, replays, None))


def block_m_candidates(rows_per_expert: float) -> list[int]:
    if rows_per_expert <= 4:
        return [16]
    if rows_per_expert <= 16:
        return [16, 32]
    if rows_per_expert <= 48:
        return [16, 32, 64]
    if rows_per_expert <= 160:
        return [32, 64, 128]
    return [64, 128]


def gemm_candidates(bm: int, n_out: int, fp8: bool, gated: bool, full: bool, group_k: int | None):
    """GEMM launch candidates for one block_m (GEMM1 when ``gated``)."""
    from moe_plugin.ops.launch_config import GemmLaunch

    cands = []
    if bm <= 32:
        bns = [16, 32, 64, 128] if full else [32, 64, 128]
        bks = [64, 128, 256] if full else [128, 256]
        stages = [3, 4, 5] if full else [4]
        for bn in bns:
            for bk in bks:
                for st in stages:
                    cands.append(GemmLaunch(bm, bn, bk, 1, 4, st))
    elif bm == 64:
        for bn, bk, w, st in [(64, 64, 4, 4), (128, 64, 4, 4), (128, 64, 8, 4), (64, 128, 4, 3), (128, 128, 8, 3)]:
            if gated and bn > 128:
                continue
            for gm in ([1, 8] if full else [8]):
                cands.append(GemmLaunch(bm, bn, bk, gm, w, st))
    else:
        shapes = [(128, 64, 8, 4), (128, 64, 8, 3), (64, 64, 4, 4), (128, 128, 8, 3)]
        if not gated:
            shapes += [(256, 64, 8, 3), (256, 64, 8, 4)]
        for bn, bk, w, st in shapes:
            for gm in ([1, 8, 16] if full else [8]):
                cands.append(GemmLaunch(bm, bn, bk, gm, w, st))
    out = []
    for c in cands:
        if c.block_n > max(16, 1 << (n_out - 1).bit_length()):
            continue
        if group_k is not None and (c.block_k > group_k or group_k % c.block_k):
            continue
        if c not in out:
            out.append(c)
    return out


class Job:
    def __init__(self, shape: str, dtype: str, m: int, path: str):
        self.shape, self.dtype, self.m, self.path = shape, dtype, m, path


def file_for(shape: str, dtype: str, out_dir: str) -> str:
    from moe_plugin.config import QuantConfig
    from moe_plugin.ops.launch_config import config_file_name, dtype_tag

    s = SHAPES[shape]
    quant = QuantConfig.fp8_block(128) if dtype == "fp8-block" else QuantConfig()
    name = config_file_name(s["num_local"], s["inter"], torch.cuda.get_device_name(), dtype_tag(torch.bfloat16, quant), quant.block_shape)
    return os.path.join(out_dir, name)


def load_table(path: str) -> dict:
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {}


def save_table(path: str, table: dict) -> None:
    meta_keys = sorted(k for k in table if k.startswith("_"))
    m_keys = sorted((k for k in table if not k.startswith("_")), key=int)
    ordered = {k: table[k] for k in meta_keys + m_keys}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(ordered, f, indent=1)
    os.replace(tmp, path)


TMA_ROUNDS = 2


def tma_step(job: Job, problem, start, replays: int, log) -> tuple[object, dict]:
    """Whole-call timings of ``start`` (a LaunchConfig) against TMA variants of its tiles and of the
    big-tile heuristic's; returns the fastest config and what was measured (empty when this device /
    dtype / size cannot take the TMA path)."""
    from moe_plugin.ops import fused_moe as fm
    from moe_plugin.ops.tma_gemm import tma_problem

    p = problem
    m = job.m
    x, w, ids = make_routing(m, p.num_experts, p.top_k, p.hidden, device=p.w1.device)
    kw = dict(expert_map=p.expert_map, global_num_experts=p.num_experts, check_inputs=False)
    if p.quant.is_quantized or tma_problem(x, p.w1, p.w2, False) or m * p.top_k <= 64:
        return start, {}
    info = fm.device_info(str(x.device))
    big = fm.heuristic_for_rows(1e9, 1.0, p.inter, p.hidden, fp8=False, num_sms=info.num_sms)
    tiles = {"big": big}
    # (split-K partials need the pointer kernel's reduction: such a winner's tiles have no TMA form)
    if start.routing != "slot" and start.gemm2.split_k == 1 and (start.gemm1, start.gemm2) != (big.gemm1, big.gemm2):
        tiles["start"] = start
    variants = {"start": start}
    for label, base in tiles.items():
        for tma in ("weights", "all"):
            for pers in (False, True):
                name = f"{label}-{tma}{'-P' if pers else ''}"
                variants[name] = replace(base, routing="sorted", tma=tma, persistent=pers, source="tuned")
    ref = fm.fused_experts_triton(x, p.w1, p.w2, w, ids, config=start, **kw)
    best_of: dict[str, float] = {}
    for _ in range(TMA_ROUNDS):
        for name, cfg in variants.items():
            out = torch.empty_like(x)
            try:
                t = time_graph_us(lambda: fm.fused_experts_triton(x, p.w1, p.w2, w, ids, config=cfg, out=out, **kw), replays)
            except Exception as exc:  # a variant that does not compile or fit is skipped
                log(f"  skip {name}: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            diff = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()
            if not math.isfinite(diff) or diff > 1e-2:
                log(f"  REJECTED {name} (differs from the starting entry's output by {diff:.2e})")
                continue
            best_of[name] = min(t, best_of.get(name, math.inf))
    if "start" not in best_of:
        return start, {}
    winner = min(best_of, key=best_of.get)
    measured = {
        "tma_variants_us": {k: round(v, 2) for k, v in best_of.items()},
        "tma_winner": winner,
        "tma_speedup": best_of["start"] / best_of[winner],
    }
    return variants[winner], measured


def tune_job(job: Job, problem, deadline: float, replays: int, full: bool, log) -> tuple[dict, dict]:
    """Best config for one M, and what was measured."""
    from moe_plugin.ops import fused_moe as fm
    from moe_plugin.ops.align import SlotSortOutputs, align_buffer_sizes, sort_slots_triton
    from moe_plugin.ops.moe_sum import moe_sum

    p = problem
    m = job.m
    num_local = p.w1.shape[0]
    x, w, ids = make_routing(m, p.num_experts, p.top_k, p.hidden, device=p.w1.device)
    fp8 = p.quant.is_quantized
    group_k = 128 if fp8 else None
    info = fm.device_info(str(x.device))
    heur = fm.heuristic_config(
        m, num_local, p.num_experts, p.inter, p.hidden, p.top_k, fp8=fp8, num_sms=info.num_sms, group_k=group_k
    )
    slots = m * p.top_k
    local_slots = slots * num_local / p.num_experts
    active = max(1.0, fm.expected_active_experts(m, p.top_k, num_local, p.num_experts))
    rpe = local_slots / active

    from moe_plugin.ops.scheme import quantize_activation

    a1q, a1s = quantize_activation(x, p.quant, None)
    ids_flat = ids.view(-1)
    emap = p.expert_map
    wflat = w.reshape(-1).contiguous()

    def routing_for(mode: str, bm: int):
        if mode == "slot":
            return fm.Routing("slot", slots, m, p.top_k, num_local, slots, slot_ids=ids_flat, expert_map=emap), None
        sorted_len, n_blocks = align_buffer_sizes(slots, bm, num_local)
        out = SlotSortOutputs(
            sorted_ids=torch.empty((sorted_len,), dtype=torch.int32, device=x.device),
            sentinel=slots,
            block_keys=torch.empty((n_blocks,), dtype=torch.int32, device=x.device),
            block_tail=-1,
            num_tokens_post_padded=torch.empty((1,), dtype=torch.int32, device=x.device),
            offsets=torch.empty((num_local + 1,), dtype=torch.int64, device=x.device),
        )

        def align():
            sort_slots_triton(ids_flat, p.top_k, num_local, bm, out, key_map=emap)

        align()
        r = fm.Routing(
            "sorted", slots, m, p.top_k, num_local, n_blocks, sorted_ids=out.sorted_ids,
            block_expert=out.block_keys, expert_offsets=out.offsets, ntpp=out.num_tokens_post_padded,
            rows_per_expert=m * p.top_k / p.num_experts,
        )
        return r, align

    a2_model = torch.empty((slots, p.inter), dtype=torch.bfloat16, device=x.device)
    if fp8:
        a2_fp8 = torch.empty((slots, p.inter), dtype=torch.float8_e4m3fn, device=x.device)
        a2_fs = torch.empty((slots, p.inter // 128), dtype=torch.float32, device=x.device)
        a2q_in, a2s_in = quantize_activation(torch.randn_like(a2_model), p.quant, None)
    y = torch.empty((slots, p.hidden), dtype=torch.bfloat16, device=x.device)
    out = torch.empty_like(x)
    qmode = "block" if fp8 else "none"
    bshape = (128, 128) if fp8 else None

    def fuses_quant(g) -> bool:
        return fp8 and g.block_n % 128 == 0

    def t_gemm1(routing, g, persistent=False):
        fused = fuses_quant(g)
        # As experts_standard does: decode tiles quantize the bf16 input on load, larger ones read FP8
        # from a separate quantization pass (timed with them).
        quant_a = fp8 and g.block_m <= 32
        if quant_a:
            g = replace(g, block_k=128)

        def fn():
            if fp8 and not quant_a:
                a_in, a_s = quantize_activation(x, p.quant, None)
            else:
                a_in, a_s = (x, None) if quant_a else (a1q, a1s)
            fm.invoke_moe_gemm(
                a_in, p.w1, a2_fp8 if fused else a2_model, routing, g, a_row_div=p.top_k, activation="silu",
                quant_mode=qmode, a_scale=a_s, b_scale=p.w1_scale, block_shape=bshape,
                c_scale=a2_fs if fused else None, quant_a=quant_a, persistent=persistent,
            )

        return time_graph_us(fn, replays)

    def t_gemm2(routing, g, persistent, fp8_input):
        # FP8 runs: GEMM2 reads FP8 + scales after a fusing GEMM1, else bf16 that it quantizes on load.
        quant_a = fp8 and not fp8_input
        if quant_a:
            g = replace(g, block_k=128)
        ybuf = y if g.split_k == 1 else torch.empty((g.split_k, slots, p.hidden), dtype=torch.float32, device=x.device)

        def fn():
            fm.invoke_moe_gemm(
                a2q_in if fp8_input else a2_model, p.w2, ybuf, routing, g, a_row_div=1, activation="none",
                quant_mode=qmode, a_scale=a2s_in if fp8_input else None, b_scale=p.w2_scale, block_shape=bshape,
                quant_a=quant_a, topk_weights=wflat, persistent=persistent,
            )
            moe_sum(ybuf.unflatten(-2, (m, p.top_k)), out, topk_ids=ids, num_experts=num_local, expert_map=emap)

        return time_graph_us(fn, replays)

    measured = {"heuristic": None, "candidates": 0, "failed": 0}
    best = None  # (total_us, LaunchConfig)
    modes = []
    if slots <= fm.SLOT_ROUTING_MAX_SLOTS:
        modes.append("slot")
    modes.append("sorted")
    heur_mode = fm.resolve_routing_mode(heur, slots)

    def evaluate(mode, bm, g1_list, g2_list, persistent_opts):
        nonlocal best
        routing, align = routing_for(mode, bm)
        t_align = time_graph_us(align, replays) if align is not None else 0.0
        best1 = best2 = None
        for g in g1_list:
            if time.monotonic() > deadline and best1 is not None:
                break
            for pers in persistent_opts:
                try:
                    t = t_gemm1(routing, g, pers)
                    measured["candidates"] += 1
                except Exception as exc:  # a candidate that does not compile or fit is skipped
                    measured["failed"] += 1
                    log(f"  skip gemm1 {g}: {type(exc).__name__}: {str(exc)[:120]}")
                    continue
                if best1 is None or t < best1[0]:
                    best1 = (t, g, pers)
        fp8_input = best1 is not None and fuses_quant(best1[1])
        for g in g2_list:
            if time.monotonic() > deadline and best2 is not None:
                break
            try:
                t = t_gemm2(routing, g, best1[2] if best1 else False, fp8_input)
                measured["candidates"] += 1
            except Exception as exc:
                measured["failed"] += 1
                log(f"  skip gemm2 {g}: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            if best2 is None or t < best2[0]:
                best2 = (t, g)
        if best1 is None or best2 is None:
            return None
        total = t_align + best1[0] + best2[0]
        cfg = fm.LaunchConfig(best1[1], replace(best2[1], block_m=bm), routing=mode, persistent=best1[2], source="tuned")
        if best is None or total < best[0]:
            best = (total, cfg)
        return total

    # 1. the heuristic, always
    h_total = evaluate(heur_mode, heur.gemm1.block_m, [heur.gemm1], [heur.gemm2], [heur.persistent])
    measured["heuristic"] = h_total
    # 2. candidates, while this job's share of the budget lasts
    big = rpe > 160
    for mode in modes:
        for bm in block_m_candidates(rpe):
            if time.monotonic() > deadline:
                break
            g1s = gemm_candidates(bm, p.inter, fp8, True, full, group_k)
            g2s = gemm_candidates(bm, p.hidden, fp8, False, full, group_k)
            if bm <= 32 and slots * num_local / p.num_experts <= 64:
                g2s += [replace(g, split_k=s) for g in g2s[:3] for s in (2, 4)]
            evaluate(mode, bm, g1s, g2s, [False, True] if big else [False])
    if best is None:
        raise RuntimeError("no candidate ran, not even the heuristic")
    total, cfg = best
    # 3. the winner must compute what the heuristic computes
    ref = fm.fused_experts_triton(x, p.w1, p.w2, w, ids, quant=p.quant, w1_scale=p.w1_scale, w2_scale=p.w2_scale,
                                  expert_map=emap, global_num_experts=p.num_experts, config=heur, check_inputs=False)
    got = fm.fused_experts_triton(x, p.w1, p.w2, w, ids, quant=p.quant, w1_scale=p.w1_scale, w2_scale=p.w2_scale,
                                  expert_map=emap, global_num_experts=p.num_experts, config=cfg, check_inputs=False)
    diff = ((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()
    if not math.isfinite(diff) or diff > (5e-2 if fp8 else 1e-2):
        log(f"  REJECTED tuned config for M={m} (differs from the heuristic's output by {diff:.2e}); keeping the heuristic")
        cfg, total = heur, h_total
    measured.update(best_us=total, speedup_vs_heuristic=(h_total / total) if h_total else None, check_rel_diff=diff)
    # 4. the TMA path, whole calls
    cfg, tma_measured = tma_step(job, p, cfg, replays, log)
    measured.update(tma_measured)
    return cfg.to_dict(), measured


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--m", default=",".join(map(str, M_VALUES)))
    ap.add_argument("--dtypes", default="bf16", help=f"comma list of {list(DTYPES)}")
    ap.add_argument("--budget-seconds", type=float, default=600.0, help="wall-clock budget for the whole search")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "..", "moe_plugin", "ops", "configs"))
    ap.add_argument("--replays", type=int, default=10, help="CUDA-graph replays per measurement (median)")
    ap.add_argument("--full", action="store_true", help="larger candidate sets (slower)")
    ap.add_argument("--force", action="store_true", help="re-tune M values already in the files")
    ap.add_argument("--tma-only", action="store_true",
                    help="only try the TMA path (whole calls) against the entries already in the files "
                         "(every existing entry is tried; --force adds nothing)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    t0 = time.monotonic()
    deadline_all = t0 + args.budget_seconds
    shapes = [s for s in args.shapes.split(",") if s]
    dtypes = [d for d in args.dtypes.split(",") if d]
    ms = [int(v) for v in args.m.split(",") if v]
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"unknown shape {s!r}; known {list(SHAPES)}")
    for d in dtypes:
        if d not in DTYPES:
            ap.error(f"unknown dtype {d!r}; known {list(DTYPES)}")
    os.makedirs(args.out_dir, exist_ok=True)
    # Round-robin over shapes so a short budget still covers every shape.
    jobs = []
    for m in ms:
        for dtype in dtypes:
            for shape in shapes:
                path = file_for(shape, dtype, args.out_dir)
                present = str(m) in load_table(path)
                if args.tma_only and not present:
                    continue  # --tma-only starts from an existing entry
                if present and not args.tma_only and not args.force:
                    continue
                jobs.append(Job(shape, dtype, m, path))
    print(f"# {len(jobs)} job(s) to tune within {args.budget_seconds:.0f}s on {torch.cuda.get_device_name()}", flush=True)
    bar = _progress(len(jobs), "tune")
    problems: dict[tuple[str, str], object] = {}
    done = 0
    for i, job in enumerate(jobs):
        now = time.monotonic()
        if now > deadline_all:
            bar.write(f"budget spent: {len(jobs) - i} job(s) left for a later run (resumable)")
            break
        key = (job.shape, job.dtype)
        if key not in problems:
            # Jobs alternate between shapes; all weights stay resident (about 10 GB for the three shapes).
            problems[key] = make_problem(job.shape, job.dtype)
        share = (deadline_all - now) / (len(jobs) - i)
        bar.set_postfix_str(f"{job.shape} {job.dtype} M={job.m}")
        try:
            if args.tma_only:
                from moe_plugin.ops.launch_config import LaunchConfig

                start = LaunchConfig.from_dict(load_table(job.path)[str(job.m)], source="tuned")
                new, measured = tma_step(job, problems[key], start, args.replays, bar.write)
                if not measured:
                    bar.write(f"{job.shape} {job.dtype} M={job.m}: no TMA path here")
                    bar.update(1)
                    continue
                cfg = new.to_dict()
                measured.setdefault("best_us", measured["tma_variants_us"][measured["tma_winner"]])
                measured.update(candidates=len(measured["tma_variants_us"]), failed=0)
            else:
                cfg, measured = tune_job(job, problems[key], now + share, args.replays, args.full, bar.write)
        except Exception as exc:
            bar.write(f"{job.shape} {job.dtype} M={job.m}: FAILED {type(exc).__name__}: {exc}")
            bar.update(1)
            continue
        table = load_table(job.path)
        table[str(job.m)] = cfg
        meta = table.setdefault("_meta", {})
        meta.update(
            device=torch.cuda.get_device_name(),
            torch=torch.__version__,
            triton=triton.__version__,
            updated=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        entry = meta.setdefault("measured_us", {}).setdefault(str(job.m), {})
        entry.update({k: (round(v, 2) if isinstance(v, float) else v) for k, v in measured.items()})
        save_table(job.path, table)
        done += 1
        sp = measured.get("speedup_vs_heuristic")
        bar.write(
            f"{job.shape} {job.dtype} M={job.m}: {measured['best_us']:.1f} us"
            + (f" ({sp:.2f}x vs heuristic)" if sp else "")
            + f", {measured['candidates']} timed, {measured['failed']} failed"
        )
        bar.update(1)
    bar.close()
    print(f"# tuned {done}/{len(jobs)} in {time.monotonic() - t0:.0f}s -> {os.path.abspath(args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
