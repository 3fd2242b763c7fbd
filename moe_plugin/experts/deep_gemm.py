"""DeepGEMM experts, contiguous layout (Standard format): FP8 w8a8 with 128x128 weight blocks on SM90 / SM100.

One call:

1. permute the FP8 tokens and their scales into DeepGEMM's contiguous layout with ``ops.permute.ep_scatter``
   (slots of other ranks, through ``expert_map`` or id -1, are dropped): each local expert's rows start on a
   multiple of the M alignment (128), ``m_indices`` names every row's expert, -1 past the last expert so
   DeepGEMM skips those blocks; the scales land column-major and TMA-aligned as DeepGEMM reads them;
2. ``m_grouped_fp8_gemm_nt_contiguous`` with w1 -> ``[M_sum, 2N]`` bf16;
3. activation + per-token-group FP8 quantization (scales column-major, TMA-aligned) in one pass,
   ``ops.activation.gated_act_fp8_quant``, which skips the rows DeepGEMM skips (``m_indices == -1``); an
   activation it does not fuse (relu2) runs as ``apply_activation`` then ``per_token_group_quant_fp8``;
4. the same grouped GEMM with w2 -> ``[M_sum, K]``;
5. ``ops.permute.ep_gather``: each token's rows back, weighted by the routing weights and summed over
   top-k: the output is ``[M, K]``, already reduced.

``M_sum`` is exact when the per-expert counts are on the host (DeepEP high-throughput), else the worst case
(``compute_aligned_M``), whose unused tail is all ``-1`` rows: DeepGEMM skips their blocks and the fused
step never touches them, so no device-to-host copy of the counts is made for it. The two-step path
(which would activate and quantize the whole tail) and EP shards (whose worst case counts every rank's
slots, ~ep_size times the real rows, in memory) still fetch the counts in eager mode.

Weights are prepared ONCE into the layout DeepGEMM wants (``prepare_weights``) and cached, keyed by the
weight tensors' storage and version: on SM90 the 128x128 fp32 block scales are used as they are; on SM100
the weights are re-quantized in place to power-of-two (UE8M0) block scales and the scales are packed into
DeepGEMM's per-row UE8M0 layout. Call ``experts.prepare_weights(weights)`` once after loading (the first
forward does it otherwise); if the weights change in place, the version check re-prepares them.

Every ``deep_gemm`` call sits in a thin method (``_gemm``); the layout logic around it is plain torch and
runs on the CPU test suite without DeepGEMM.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..config import FP8_DTYPE, MoEConfig, ScaleFormat
from ..modular import (
    ActivationFormat,
    ExpertTokensMetadata,
    ExpertWeights,
    PermuteExpertsUnpermute,
    TopKWeightAndReduce,
    WeightAndReduceNoOp,
    WorkspaceShapes,
)
from ..ops.activation import FUSED_QUANT_ACTIVATIONS, activation_output_dim, apply_activation, gated_act_fp8_quant
from ..ops.permute import compute_aligned_M, ep_gather, ep_scatter
from ..ops.quant import (
    FP8_MAX,
    dequant_block_weight,
    mn_major_scales,
    per_token_group_quant_fp8,
    round_scale_ue8m0,
    tma_aligned_size,
)

logger = logging.getLogger(__name__)

DEEPGEMM_BLOCK = 128
"""DeepGEMM's FP8 recipe: 1x128 activation groups, 128x128 weight blocks."""

DEEPGEMM_M_ALIGNMENT = 128
"""Rows per expert in the contiguous layout are padded to this (``get_mk_alignment_for_contiguous_layout``
of DeepGEMM 2.x on SM90/SM100; the library's own value is used when it is importable)."""

DEEPGEMM_MIN_TOKENS: dict[tuple[int, int], int] = {
    # DeepSeek-V3 EP8 shard, with the Triton FP8 launch configs tuned 2026-11-26: Triton FP8 579 vs DeepGEMM
    # 659 us at M=1024, 695 vs 677 at 2048, 1010 vs 875 at 4096 (the untuned configs had crossed at 1024);
    # re-measured with the expert-bounded tile groups (same day, two runs): 578-580 vs 646-648 at 1024,
    # 669-672 vs 660 at 2048, 799-806 vs 678 at 3072, 962-976 vs 849 at 4096
    (7168, 2048): 2048,
    (2048, 768): 4096,  # qwen3-30B-A3B: Triton FP8 343 vs DeepGEMM 424 us at M=1024, 881 vs 666 at 4096
    # Mixtral-8x7B: DeepGEMM 664 vs Triton FP8 757 us at M=64 but 712 vs 664 at 256; 1053 vs 1592 at 1024,
    # 2649 vs 5609 at 4096: it wins at every measured size from 1024 up
    (4096, 14336): 1024,
}
"""Measured crossovers, ``(K, N) -> `` the smallest ``MoEConfig.max_num_tokens`` (tokens per call on a rank)
at which DeepGemmExperts beat the Triton FP8 experts: scripts/bench_deepgemm.py on an H100, 2026-11-25
(DeepSeek shard: 2026-11-26), CUDA-graph medians (docs/benchmarks.md). Small matrices cross over later: DeepGEMM's fixed cost outside
the GEMMs (scatter, activation, gather) weighs more against a cheap GEMM. A shape not listed takes the
crossover of the measured shape whose ``K * N`` is nearest on a log scale (``deepgemm_min_tokens``)."""


def deepgemm_min_tokens(hidden_size: int, intermediate_size: int) -> tuple[int, str]:
    """The crossover for ``(K, N)`` and which measurement it comes from (for explain())."""
    size = math.log(hidden_size * intermediate_size)
    (k, n), tokens = min(DEEPGEMM_MIN_TOKENS.items(), key=lambda item: abs(math.log(item[0][0] * item[0][1]) - size))
    source = "measured" if (k, n) == (hidden_size, intermediate_size) else "nearest measured shape"
    return tokens, f"{source} K={k} N={n}"


SUPPORTED_ARCH_MAJORS = (9, 10)

_CONTIGUOUS_NAMES = ("m_grouped_fp8_gemm_nt_contiguous", "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous")
_MASKED_NAMES = (
    "m_grouped_fp8_gemm_nt_masked",
    "fp8_m_grouped_gemm_nt_masked",
    "m_grouped_gemm_fp8_fp8_bf16_nt_masked",
)
_ALIGNMENT_NAMES = ("get_mk_alignment_for_contiguous_layout", "get_m_alignment_for_contiguous_layout")


# ---- the library -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeepGemmAPI:
    """The entry points of the installed DeepGEMM, whichever release named them.

    2.x: ``m_grouped_fp8_gemm_nt_contiguous`` / ``m_grouped_fp8_gemm_nt_masked`` (the newest also under
    ``m_grouped_fp8_fp4_*``); 1.x: ``m_grouped_gemm_fp8_fp8_bf16_nt_*``. All take ``(a, a_scale)``,
    ``(b, b_scale)``, the output, then ``m_indices`` or ``(masked_m, expected_m)``.
    """

    module: Any
    contiguous: Callable
    masked: Callable
    alignment: int
    transform_sf: Callable | None
    version: str


def _first_attr(module: Any, names: tuple[str, ...]) -> Callable | None:
    for owner in (module, getattr(module, "utils", None)):
        for name in names:
            fn = getattr(owner, name, None) if owner is not None else None
            if fn is not None:
                return fn
    return None


@functools.lru_cache(maxsize=1)
def deep_gemm_api() -> DeepGemmAPI:
    """Import ``deep_gemm`` and resolve its grouped FP8 GEMMs; a clear error when it is not DeepSeek's."""
    try:
        module = importlib.import_module("deep_gemm")
    except Exception as exc:
        raise RuntimeError(
            f"deep_gemm cannot be imported ({type(exc).__name__}: {exc}); build DeepGEMM from "
            "https://github.com/deepseek-ai/DeepGEMM (see docs/backends.md)"
        ) from exc
    contiguous = _first_attr(module, _CONTIGUOUS_NAMES)
    masked = _first_attr(module, _MASKED_NAMES)
    if contiguous is None or masked is None:
        raise RuntimeError(
            f"the deep_gemm module at {getattr(module, '__file__', '?')} has no m-grouped FP8 GEMMs "
            f"({_CONTIGUOUS_NAMES[0]}): it is not DeepSeek's DeepGEMM (the PyPI package named deep-gemm is an "
            "unrelated project); see docs/backends.md"
        )
    align_fn = _first_attr(module, _ALIGNMENT_NAMES)
    alignment = int(align_fn()) if align_fn is not None else DEEPGEMM_M_ALIGNMENT
    transform = _first_attr(module, ("transform_sf_into_required_layout",))
    return DeepGemmAPI(module, contiguous, masked, alignment, transform, str(getattr(module, "__version__", "?")))


def looks_like_deep_gemm(module: Any) -> bool:
    """Whether an imported ``deep_gemm`` module carries DeepSeek's grouped GEMMs."""
    return _first_attr(module, _CONTIGUOUS_NAMES) is not None and _first_attr(module, _MASKED_NAMES) is not None


def deep_gemm_problems(config: MoEConfig, caps: Any, *, batched: bool) -> list[str]:
    """Every reason DeepGEMM experts cannot serve ``config`` on ``caps`` (empty when they can)."""
    problems = []
    loaded = sys.modules.get("deep_gemm")
    if loaded is not None and not looks_like_deep_gemm(loaded):
        problems.append(
            "the importable deep_gemm is not DeepSeek's DeepGEMM (no m_grouped_fp8_gemm_nt_*; the PyPI "
            "deep-gemm package is unrelated)"
        )
    if not caps.is_cuda:
        problems.append(f"needs an SM90/SM100 CUDA GPU, device is {caps.device_type}")
    elif caps.capability is None or caps.capability[0] not in SUPPORTED_ARCH_MAJORS:
        cap = "unknown" if caps.capability is None else f"sm{caps.capability[0]}{caps.capability[1]}"
        problems.append(f"needs SM90 (Hopper) or SM100 (Blackwell), device is {cap}")
    elif caps.capability[0] == 10 and config.quant.scale_format is not ScaleFormat.UE8M0:
        problems.append("SM100 DeepGEMM reads UE8M0 scales: use QuantConfig.fp8_block(scale_format='ue8m0')")
    quant = config.quant
    if not quant.is_fp8_block or quant.block_shape != (DEEPGEMM_BLOCK, DEEPGEMM_BLOCK):
        problems.append(f"needs FP8 w8a8 with {DEEPGEMM_BLOCK}x{DEEPGEMM_BLOCK} weight blocks, quant is {quant.name}")
    if config.hidden_size % DEEPGEMM_BLOCK:
        problems.append(f"hidden_size K={config.hidden_size} is not a multiple of {DEEPGEMM_BLOCK}")
    if config.intermediate_size % DEEPGEMM_BLOCK:
        problems.append(f"intermediate_size N={config.intermediate_size} is not a multiple of {DEEPGEMM_BLOCK}")
    if config.dtype != torch.bfloat16:
        problems.append(f"dtype={config.dtype}: DeepGEMM writes bfloat16 outputs")
    if batched and config.activation != "silu":
        problems.append(f"activation={config.activation!r}: the masked path fuses SiLU-mul-quant only")
    return problems


# ---- layout logic (plain torch) -----------------------------------------------------------------------------


def local_expert_ids_of_slots(topk_ids: torch.Tensor, expert_map: torch.Tensor | None) -> torch.Tensor:
    """``[M, k]`` int64 local expert of every slot, -1 where the expert is elsewhere (or the id is -1)."""
    ids = topk_ids.to(torch.int64)
    if expert_map is None:
        return ids
    mapped = expert_map.to(device=ids.device, dtype=torch.int64)[ids.clamp(min=0)]
    return torch.where(ids >= 0, mapped, -1)


def local_counts(local_ids: torch.Tensor, num_local_experts: int) -> torch.Tensor:
    """``[E_local]`` int64 routed slots per local expert (-1 ignored), without a host sync."""
    flat = local_ids.reshape(-1)
    key = torch.where(flat >= 0, flat, num_local_experts)
    counts = torch.zeros(num_local_experts + 1, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    return counts[:num_local_experts]


# ---- weights ------------------------------------------------------------------------------------------------


def requant_block_weight_ue8m0(
    w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (DEEPGEMM_BLOCK, DEEPGEMM_BLOCK)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-quantize one expert's FP8 weight ``[R, C]`` so its block scales are powers of two (UE8M0).

    Each scale rounds UP to the next power of two and the block's values shrink by the same factor, so
    nothing overflows; the cost is at most one bit of mantissa per value.
    """
    new_scale = round_scale_ue8m0(scale.float())
    bn, bk = block
    r, c = w.shape
    expand = new_scale.repeat_interleave(bn, dim=0)[:r].repeat_interleave(bk, dim=1)[:, :c]
    deq = dequant_block_weight(w, scale, block)
    return (deq / expand).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), new_scale


def is_power_of_two(scale: torch.Tensor) -> bool:
    bits = scale.float().contiguous().view(torch.int32)
    return bool(((bits & 0x7FFFFF) == 0).all())


@dataclass
class DeepGemmWeights:
    """Weights in the layout the installed DeepGEMM reads on this device."""

    w1: torch.Tensor
    w1_scale: torch.Tensor
    w2: torch.Tensor
    w2_scale: torch.Tensor
    arch_major: int


def check_fp8_block_weights(weights: ExpertWeights) -> None:
    """The weights DeepGemm experts accept: FP8 ``w1 [E, 2N, K]`` / ``w2 [E, K, N]`` contiguous with fp32
    128x128 block scales."""
    for name in ("w1", "w2"):
        w = getattr(weights, name)
        s = getattr(weights, f"{name}_scale")
        if w.dtype != FP8_DTYPE:
            raise TypeError(f"{name} must be float8_e4m3fn for DeepGEMM, got {w.dtype}")
        if w.dim() != 3 or not w.is_contiguous():
            raise ValueError(f"{name} must be a contiguous [E, rows, cols] tensor, got shape {tuple(w.shape)}")
        want = (w.shape[0], math.ceil(w.shape[1] / DEEPGEMM_BLOCK), math.ceil(w.shape[2] / DEEPGEMM_BLOCK))
        if s is None or s.dtype != torch.float32 or tuple(s.shape) != want:
            got = None if s is None else (s.dtype, tuple(s.shape))
            raise ValueError(f"{name}_scale must be fp32 {want} (128x128 blocks), got {got}")


class PreparedWeightCache:
    """``DeepGemmWeights`` per set of weight tensors, keyed by their storage and checked against their
    version counters so an in-place update re-prepares. Bounded (LRU): one entry per MoE layer."""

    def __init__(self, max_entries: int = 512):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, tuple[tuple, DeepGemmWeights]] = OrderedDict()

    @staticmethod
    def _tensors(weights: ExpertWeights) -> tuple[torch.Tensor, ...]:
        return (weights.w1, weights.w1_scale, weights.w2, weights.w2_scale)

    @classmethod
    def key(cls, weights: ExpertWeights) -> tuple:
        return tuple((t.data_ptr(), tuple(t.shape), t.device) for t in cls._tensors(weights))

    @classmethod
    def versions(cls, weights: ExpertWeights) -> tuple:
        return tuple(t._version for t in cls._tensors(weights))

    def get(self, weights: ExpertWeights, prepare: Callable[[ExpertWeights], DeepGemmWeights]) -> DeepGemmWeights:
        key = self.key(weights)
        hit = self._entries.get(key)
        if hit is not None and hit[0] == self.versions(weights):
            self._entries.move_to_end(key)
            return hit[1]
        prepared = prepare(weights)
        # Versions after preparing: SM100 re-quantizes in place and must not re-prepare next call.
        self._entries[key] = (self.versions(weights), prepared)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return prepared

    def __len__(self) -> int:
        return len(self._entries)


def prepare_deep_gemm_weights(weights: ExpertWeights, arch_major: int, transform_sf: Callable | None) -> DeepGemmWeights:
    """Bring ``weights`` into DeepGEMM's layout for ``arch_major`` (see module docstring)."""
    check_fp8_block_weights(weights)
    if arch_major == 9:
        return DeepGemmWeights(weights.w1, weights.w1_scale.contiguous(), weights.w2, weights.w2_scale.contiguous(), 9)
    if arch_major != 10:
        raise ValueError(f"DeepGEMM runs on SM90 / SM100, got SM{arch_major}x")
    with torch.no_grad():
        for name in ("w1", "w2"):
            w, s = getattr(weights, name), getattr(weights, f"{name}_scale")
            if is_power_of_two(s):
                continue
            logger.info("moe_plugin: re-quantizing %s to UE8M0 block scales for SM100 DeepGEMM (in place)", name)
            for e in range(w.shape[0]):
                qw, qs = requant_block_weight_ue8m0(w[e], s[e])
                w[e].copy_(qw)
                s[e].copy_(qs)
    scales = []
    for name in ("w1", "w2"):
        w, s = getattr(weights, name), getattr(weights, f"{name}_scale")
        if transform_sf is None:
            scales.append(s)  # older DeepGEMM packs per call
        else:
            scales.append(
                transform_sf(s, w.shape[1], w.shape[2], (1, DEEPGEMM_BLOCK, DEEPGEMM_BLOCK), w.shape[0], False)
            )
    return DeepGemmWeights(weights.w1, scales[0], weights.w2, scales[1], 10)


def _fp8_view(workspace: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``[rows, cols]`` FP8 carved out of a workspace of another dtype."""
    return workspace.reshape(-1).view(torch.uint8)[: rows * cols].view(rows, cols).view(FP8_DTYPE)


def _typed_view(workspace: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    flat = workspace.reshape(-1).view(torch.uint8)
    nbytes = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
    return flat[:nbytes].view(dtype).view(shape)


def _a2_bytes(m_sum: int, act: int) -> int:
    """Bytes of the FP8 activation ``[m_sum, act]`` plus its column-major TMA-aligned fp32 scales."""
    return m_sum * act + 4 * tma_aligned_size(m_sum) * math.ceil(act / DEEPGEMM_BLOCK)


def _a2_views(workspace2: torch.Tensor, offset_bytes: int, m_sum: int, act: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP8 activation and its scales (DeepGEMM's column-major layout), carved out of ``workspace2``
    after its first ``offset_bytes``; both start on 16-byte boundaries (m_sum and act are multiples of 128)."""
    flat = workspace2.reshape(-1).view(torch.uint8)
    q = flat[offset_bytes : offset_bytes + m_sum * act].view(m_sum, act).view(FP8_DTYPE)
    groups = math.ceil(act / DEEPGEMM_BLOCK)
    ld = tma_aligned_size(m_sum)
    start = offset_bytes + m_sum * act
    scales = flat[start : start + 4 * ld * groups].view(torch.float32).as_strided((m_sum, groups), (1, ld))
    return q, scales


class DeepGemmExpertsBase(PermuteExpertsUnpermute):
    """What the DeepGEMM experts of both layouts share: DeepGEMM's FP8 recipe, the prepared-weight cache
    and bfloat16 outputs."""

    required_modules = ("deep_gemm",)
    supports_expert_map = True

    def __init__(self, config: MoEConfig):
        super().__init__(config)
        if not config.quant.is_fp8_block or config.quant.block_shape != (DEEPGEMM_BLOCK, DEEPGEMM_BLOCK):
            raise ValueError(f"{type(self).__name__} needs QuantConfig.fp8_block(128), got {config.quant.name}")
        self.weight_cache = PreparedWeightCache()

    def prepare_weights(self, weights: ExpertWeights) -> DeepGemmWeights:
        """DeepGEMM-ready weights for ``weights`` (prepared once, then cached; see the module docstring)."""
        device = weights.w1.device
        if device.type != "cuda":
            raise ValueError(f"DeepGEMM weights must be on a CUDA device, w1 is on {device}")
        arch = torch.cuda.get_device_capability(device)[0]
        api = deep_gemm_api()
        return self.weight_cache.get(weights, lambda w: prepare_deep_gemm_weights(w, arch, api.transform_sf))

    @staticmethod
    def _check_output(output: torch.Tensor) -> None:
        if output.dtype != torch.bfloat16:
            raise TypeError(f"DeepGEMM writes bfloat16; the output is {output.dtype}")


class DeepGemmExperts(DeepGemmExpertsBase):
    """Standard-format FP8 block experts on DeepGEMM's contiguous grouped GEMM; weights and reduces
    itself (output ``[M', K]``)."""

    name = "deep_gemm"
    activation_format = ActivationFormat.STANDARD
    # Behind a local prepare the input is quantized inside ep_scatter: one read of the tokens this rank
    # computes instead of a quantize pass over every token and a copy of the FP8 rows.
    quantizes_own_input = True

    @classmethod
    def supports(cls, config: MoEConfig, caps: Any) -> tuple[bool, str]:
        problems = deep_gemm_problems(config, caps, batched=False)
        min_tokens, source = deepgemm_min_tokens(config.hidden_size, config.intermediate_size)
        if config.max_num_tokens < min_tokens:
            problems.append(
                f"max_num_tokens={config.max_num_tokens} is below DEEPGEMM_MIN_TOKENS={min_tokens} ({source}), "
                "where the Triton FP8 experts are faster (scripts/bench_deepgemm.py)"
            )
        return (False, "; ".join(problems)) if problems else (True, "")

    def weight_and_reduce(self) -> TopKWeightAndReduce:
        return WeightAndReduceNoOp()

    def _alignment(self) -> int:
        try:
            return deep_gemm_api().alignment
        except RuntimeError:
            return DEEPGEMM_M_ALIGNMENT

    fuse_activation_quant: bool = True
    """Run step 3 as one fused pass where the activation allows it; False forces the two-step path (the
    benchmark's before/after comparison sets it per instance)."""

    def _fused(self, activation: str) -> bool:
        return self.fuse_activation_quant and activation in FUSED_QUANT_ACTIVATIONS

    def workspace_shapes(self, num_tokens, n, k, top_k, global_num_experts, local_num_experts, meta, activation):
        alignment = self._alignment()
        m_sum = max(compute_aligned_M(num_tokens, top_k, local_num_experts, alignment, meta), alignment)
        act = activation_output_dim(activation, n)
        # Lifetimes (model-dtype elements): ws13 holds the permuted FP8 tokens, then (two-step path) the
        # activation output, then GEMM2's output; ws2 holds GEMM1's output and, behind it, the re-quantized
        # activation and its scales (_a2_views), which GEMM2 reads while it writes ws13.
        a2_bytes = _a2_bytes(m_sum, act)
        return WorkspaceShapes(
            workspace13=(m_sum * max(k, act),),
            workspace2=(m_sum * n + (a2_bytes + 1) // 2,),
            output=(num_tokens, k),
        )

    # ---- deep_gemm (thin) ------------------------------------------------------------------------------

    def _gemm(self, a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
              out: torch.Tensor, m_indices: torch.Tensor) -> None:
        deep_gemm_api().contiguous((a, a_scale), (w, w_scale), out, m_indices)

    # ---- apply ----------------------------------------------------------------------------------------

    @staticmethod
    def _rows(
        topk_ids: torch.Tensor,
        expert_map: torch.Tensor | None,
        num_local: int,
        alignment: int,
        meta: ExpertTokensMetadata | None,
        fetch_counts: bool = True,
    ) -> int:
        """Rows of the contiguous layout for this call (``compute_aligned_M``).

        Exact when the counts are on the host (DeepEP high-throughput hands them over), or when
        ``fetch_counts`` and the call is eager (one small device-to-host copy, cheaper than activating and
        quantizing padding rows on the two-step path); the worst case otherwise (inside CUDA-graph capture
        the host cannot read the counts; the fused path skips the tail rows instead).
        """
        m, top_k = topk_ids.shape
        if meta is None or meta.expert_num_tokens_cpu is None:
            capturing = topk_ids.is_cuda and torch.cuda.is_current_stream_capturing()
            if fetch_counts and not capturing:
                counts = local_counts(local_expert_ids_of_slots(topk_ids, expert_map), num_local)
                meta = ExpertTokensMetadata(counts, counts.cpu())
        return max(compute_aligned_M(m, top_k, num_local, alignment, meta), alignment)

    def apply(
        self,
        output,
        hidden_states,
        weights,
        topk_weights,
        topk_ids,
        *,
        activation,
        global_num_experts,
        expert_map,
        a1q_scale,
        workspace13,
        workspace2,
        expert_tokens_meta,
        apply_router_weight_on_input,
    ) -> None:
        quantize_here = hidden_states.dtype in (torch.bfloat16, torch.float16, torch.float32) and a1q_scale is None
        if not quantize_here and (hidden_states.dtype != FP8_DTYPE or a1q_scale is None):
            raise TypeError(
                f"{type(self).__name__} takes FP8 activations with 1x128 scales, or bf16/fp16/fp32 activations "
                f"without scales (quantized here), got {hidden_states.dtype} with scale "
                f"{None if a1q_scale is None else tuple(a1q_scale.shape)}"
            )
        self._check_output(output)
        m, k = hidden_states.shape
        if m == 0:
            return
        prepared = self.prepare_weights(weights)
        num_local = prepared.w1.shape[0]
        n = prepared.w1.shape[1]
        act = activation_output_dim(activation, n)
        groups = k // DEEPGEMM_BLOCK
        alignment = self._alignment()
        fused = self._fused(activation)
        # The fused path needs no exact row count, except on an EP shard without host counts: there the
        # worst case sizes buffers for every slot (all ranks' experts), ~ep_size times the real rows, and
        # one small count copy is cheaper than that memory.
        fetch = not fused or expert_map is not None
        m_sum = self._rows(topk_ids, expert_map, num_local, alignment, expert_tokens_meta, fetch_counts=fetch)

        use_ue8m0 = self.quant.scale_format is ScaleFormat.UE8M0
        scattered = ep_scatter(
            hidden_states,
            None if quantize_here else a1q_scale.reshape(m, groups),
            topk_ids,
            num_local,
            expert_map,
            alignment=alignment,
            m_sum=m_sum,
            fill_invalid_expert=-1,  # DeepGEMM skips blocks whose first row is -1
            out=_fp8_view(workspace13, m_sum, k),
            out_scales=mn_major_scales(m_sum, groups, hidden_states.device),
            quant_group_size=DEEPGEMM_BLOCK if quantize_here else None,
            use_ue8m0=use_ue8m0,
        )
        mm1 = _typed_view(workspace2, torch.bfloat16, (m_sum, n))
        self._gemm(scattered.hidden_states, scattered.scales, prepared.w1, prepared.w1_scale, mm1, scattered.m_indices)

        if fused:
            a2q, a2_scale = _a2_views(workspace2, m_sum * n * mm1.element_size(), m_sum, act)
            gated_act_fp8_quant(
                mm1,
                activation,
                DEEPGEMM_BLOCK,
                m_indices=scattered.m_indices,
                use_ue8m0=use_ue8m0,
                out=a2q,
                out_scales=a2_scale,
            )
        else:
            act_out = _typed_view(workspace13, torch.bfloat16, (m_sum, act))
            apply_activation(activation, mm1, out=act_out)
            a2q, a2_scale = per_token_group_quant_fp8(
                act_out, DEEPGEMM_BLOCK, use_ue8m0=use_ue8m0, column_major_scales=True
            )

        mm2 = _typed_view(workspace13, torch.bfloat16, (m_sum, k))
        self._gemm(a2q, a2_scale, prepared.w2, prepared.w2_scale, mm2, scattered.m_indices)
        # weights already applied on the input (top-1 models): an unweighted sum
        ep_gather(mm2, None if apply_router_weight_on_input else topk_weights, scattered.inv_perm, out=output)
