"""Pieces shared by the DeepEP prepare/finalize backends (``deepep_ht``, ``deepep_ll``).

Three kinds of code live here:

- plain-torch functions that turn what DeepEP documents it returns into moe_plugin's formats (expert id
  conversion, token counts, UE8M0 scale packing, the low-latency limits). They run on any device, so the
  CPU test suite covers them without DeepEP;
- the ``deep_ep.Buffer`` cache: one buffer per (process group, mode), sized from DeepEP's own size hints,
  grown when a layer needs more, and released by ``release_buffers()`` (also registered with ``atexit``);
- ``DeepEPPrepareAndFinalizeBase``, what both backends do alike: the EP group, the expert renumbering,
  the buffer request, chunk agreement and the checks every dispatch makes.

Targets DeepEP's V1 API (``deep_ep.Buffer``, NVSHMEM-based; the last V1 commit on main, 567632d, or the tag
v1.2.1). DeepEP main is now V2 (``deep_ep.ElasticBuffer``, NCCL-based), which this module does not drive.

DeepEP assumes rank ``r`` owns experts ``[r * E_local, (r + 1) * E_local)``. With another placement
(``ExpertPlacement.ROUND_ROBIN``) ids are renumbered into that rank-major "physical" order before a dispatch
(``physical_expert_ids``), so DeepEP's rank-local ids still index the rank's own weights.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..config import ExpertPlacement, MoEConfig, ParallelConfig, QuantConfig, QuantScheme
from ..distributed import EPGroup, local_expert_ids
from ..modular import AsyncPrepareAndFinalize

logger = logging.getLogger(__name__)

DEEPEP_GROUP = 128
"""DeepEP casts and ships FP8 activations with one scale per token per 128 columns."""

LL_HIDDEN_SIZES = (2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192)
"""Hidden sizes the low-latency kernels are compiled for (DeepEP's ``SWITCH_HIDDEN``)."""

LL_MAX_TOP_K = 11
"""Largest top-k of the low-latency dispatch kernel (``kNumMaxTopK``)."""

DEFAULT_QP_DEPTH = 1024
"""NVSHMEM queue-pair depth DeepEP sets when ``NVSHMEM_QP_DEPTH`` is unset; a low-latency call asserts
``depth >= (max_tokens_per_rank + 1) * 2``."""

HT_INTRANODE_RANKS = (2, 4, 8)
"""Group sizes of intranode (NVLink only) high-throughput kernels."""

HT_TUNED_RANKS = (2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 144, 160)
"""Group sizes with a tuned ``Buffer.get_dispatch_config`` / ``get_combine_config`` entry; DeepEP asserts
on any other size. Sizes above 8 are internode (NVLink + RDMA, multiples of 8 GPUs per node)."""

NUM_MAX_LOCAL_EXPERTS = 1024
"""DeepEP's high-throughput kernels hold at most this many experts per rank."""


class DeepEPUnavailableError(RuntimeError):
    """``deep_ep`` cannot be imported or the process group cannot carry it."""


def import_deep_ep() -> Any:
    """``import deep_ep`` with an error that says how to get the real library."""
    try:
        import deep_ep
    except Exception as exc:  # missing, ABI mismatch, NVSHMEM not loadable...
        raise DeepEPUnavailableError(
            f"deep_ep cannot be imported ({type(exc).__name__}: {exc}). Build DeepEP from "
            "https://github.com/deepseek-ai/DeepEP against NVSHMEM (the PyPI package named deep-ep is an "
            "unrelated project); see docs/backends.md"
        ) from exc
    if not hasattr(deep_ep, "Buffer"):
        raise DeepEPUnavailableError(
            f"the deep_ep module at {getattr(deep_ep, '__file__', '?')} has no Buffer: it is not DeepSeek's "
            "DeepEP (the PyPI package named deep-ep is an unrelated project); see docs/backends.md"
        )
    return deep_ep


def topk_idx_dtype(deep_ep: Any | None = None) -> torch.dtype:
    """The id dtype DeepEP was built with (``deep_ep.topk_idx_t``, int64 unless built otherwise)."""
    return getattr(deep_ep, "topk_idx_t", torch.int64) if deep_ep is not None else torch.int64


# ---- limits --------------------------------------------------------------------------------------------


def ll_max_tokens_per_rank(qp_depth: int | None = None) -> int:
    """Most tokens per rank a low-latency call may carry at NVSHMEM queue depth ``qp_depth`` (511 at the
    default depth of 1024)."""
    if qp_depth is None:
        raw = os.environ.get("NVSHMEM_QP_DEPTH", str(DEFAULT_QP_DEPTH))
        try:
            qp_depth = int(raw)
        except ValueError:
            raise ValueError(f"NVSHMEM_QP_DEPTH must be an int, got {raw!r}") from None
    return qp_depth // 2 - 1


def low_latency_problems(
    *,
    hidden_size: int,
    top_k: int,
    max_tokens_per_rank: int,
    world_size: int,
    num_experts: int,
    dtype: torch.dtype,
    quant: QuantConfig,
    qp_depth: int | None = None,
) -> list[str]:
    """Every reason the low-latency kernels cannot serve this shape (empty when they can)."""
    problems = []
    if hidden_size not in LL_HIDDEN_SIZES:
        problems.append(f"hidden_size={hidden_size} is not one of the low-latency sizes {LL_HIDDEN_SIZES}")
    if top_k > LL_MAX_TOP_K:
        problems.append(f"top_k={top_k} exceeds the low-latency limit of {LL_MAX_TOP_K}")
    limit = ll_max_tokens_per_rank(qp_depth)
    if max_tokens_per_rank > limit:
        problems.append(
            f"max_num_tokens={max_tokens_per_rank} per rank exceeds {limit}, the most the NVSHMEM queue depth "
            f"allows ((max_num_tokens + 1) * 2 <= NVSHMEM_QP_DEPTH={2 * (limit + 1)})"
        )
    if (max_tokens_per_rank * world_size) % 4:
        problems.append(
            f"max_num_tokens * ep_size = {max_tokens_per_rank} * {world_size} must be a multiple of 4 "
            "(TMA-aligned scale rows)"
        )
    if num_experts % world_size:
        problems.append(f"num_experts={num_experts} is not divisible by ep_size={world_size}")
    if dtype != torch.bfloat16:
        problems.append(f"dtype={dtype} (DeepEP low-latency kernels move bfloat16 activations only)")
    if quant.is_quantized and not (quant.is_fp8_block and quant.block_shape[1] == DEEPEP_GROUP):
        problems.append(
            f"quant={quant.name}: low-latency dispatch casts to FP8 with per-token 1x{DEEPEP_GROUP} groups only"
        )
    return problems


def check_low_latency(**kwargs: Any) -> None:
    """``ValueError`` listing every reason ``low_latency_problems`` finds."""
    problems = low_latency_problems(**kwargs)
    if problems:
        raise ValueError("DeepEP low-latency mode cannot serve this layer: " + "; ".join(problems))


def capability_problems(caps: Any, config: MoEConfig, *, low_latency: bool) -> list[str]:
    """Device reasons: CUDA; SM80+ for intranode bf16; SM90+ for the low-latency kernels and for FP8
    (DeepEP builds those only with its SM90 features)."""
    if not caps.is_cuda:
        return [f"needs CUDA GPUs, device is {caps.device_type}"]
    cap = caps.capability or (0, 0)
    sm = f"sm{cap[0]}{cap[1]}"
    if cap < (8, 0):
        return [f"needs SM80 or newer, device is {sm}"]
    if cap < (9, 0) and (low_latency or config.quant.is_quantized):
        what = "low-latency kernels" if low_latency else "FP8 dispatch"
        return [f"DeepEP's {what} need SM90 features, device is {sm}"]
    return []


def high_throughput_problems(config: MoEConfig) -> list[str]:
    """Every reason the high-throughput kernels cannot serve ``config`` (empty when they can)."""
    problems = []
    world = config.parallel.ep_size
    if world not in HT_TUNED_RANKS:
        problems.append(
            f"ep_size={world}: high-throughput kernels run on {HT_INTRANODE_RANKS} ranks intranode or "
            f"{HT_TUNED_RANKS[3:]} internode"
        )
    if config.num_local_experts > NUM_MAX_LOCAL_EXPERTS:
        problems.append(f"{config.num_local_experts} local experts exceed DeepEP's {NUM_MAX_LOCAL_EXPERTS}")
    if config.dtype != torch.bfloat16:
        problems.append(f"dtype={config.dtype} (DeepEP combines bfloat16 only)")
    if (config.hidden_size * 2) % 16:
        problems.append(f"hidden_size={config.hidden_size}: rows must be whole 16-byte vectors")
    quant = config.quant
    if quant.is_fp8_block and config.hidden_size % quant.block_shape[1]:
        problems.append(f"hidden_size={config.hidden_size} is not a multiple of the {quant.block_shape[1]}-column groups")
    return problems


# ---- expert ids ----------------------------------------------------------------------------------------


def physical_expert_ids(num_experts: int, parallel: ParallelConfig) -> torch.Tensor | None:
    """``[E]`` int64 map from moe_plugin's global id to DeepEP's rank-major id ``owner * E_local + local``.

    None for the contiguous placement, where the two numberings agree.
    """
    if parallel.placement is ExpertPlacement.CONTIGUOUS or parallel.ep_size == 1:
        return None
    per_rank = num_experts // parallel.ep_size
    physical = torch.empty(num_experts, dtype=torch.int64)
    for rank in range(parallel.ep_size):
        owned = local_expert_ids(num_experts, ParallelConfig(parallel.ep_size, rank, parallel.placement))
        physical[torch.tensor(owned)] = torch.arange(rank * per_rank, (rank + 1) * per_rank)
    return physical


def to_deepep_ids(topk_ids: torch.Tensor, physical: torch.Tensor | None, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Ids as DeepEP takes them: ``dtype`` (``deep_ep.topk_idx_t``), contiguous, rank-major numbering,
    -1 (no expert) kept."""
    ids = topk_ids.to(torch.int64)
    if physical is not None:
        physical = physical.to(ids.device)
        ids = torch.where(ids >= 0, physical[ids.clamp(min=0)], ids)
    return ids.to(dtype).contiguous()


def local_to_global_ids(recv_local_ids: torch.Tensor, local_global_ids: torch.Tensor) -> torch.Tensor:
    """Turn high-throughput dispatch's received ids into the Standard format's global ids.

    DeepEP returns, for each received token and slot, the rank-LOCAL expert id when the slot's expert lives
    on this rank and -1 otherwise. ``local_global_ids [E_local]`` lists this rank's experts' global ids in
    local order; the result is int32 global ids with -1 kept, which ``expert_map`` maps back to local ids.
    """
    if recv_local_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"recv_local_ids must be int32 or int64, got {recv_local_ids.dtype}")
    table = local_global_ids.to(device=recv_local_ids.device, dtype=torch.int64)
    ids = recv_local_ids.to(torch.int64)
    return torch.where(ids >= 0, table[ids.clamp(min=0)], ids).to(torch.int32)


def count_local_tokens(recv_local_ids: torch.Tensor, num_local_experts: int) -> torch.Tensor:
    """``[E_local]`` int32 routed slots per local expert from rank-local ids (-1 ignored).

    A scatter-add into a fixed-size tensor rather than ``bincount``: no host synchronisation, so it can run
    inside a CUDA graph.
    """
    ids = recv_local_ids.reshape(-1).to(torch.int64)
    # Slot num_local_experts collects the -1 entries and is dropped.
    target = torch.where(ids >= 0, ids, num_local_experts)
    counts = torch.zeros(num_local_experts + 1, dtype=torch.int32, device=ids.device)
    counts.scatter_add_(0, target, torch.ones_like(target, dtype=torch.int32))
    return counts[:num_local_experts]


# ---- scales ----------------------------------------------------------------------------------------------


def pack_ue8m0(scales: torch.Tensor) -> torch.Tensor:
    """Pack power-of-two fp32 scales ``[..., G]`` into int32 ``[..., ceil(G/4)]``: one exponent byte per
    scale, four per word, lowest group in the lowest byte (the layout DeepEP's ``use_ue8m0`` dispatch and
    DeepGEMM's SM100 kernels read). Missing groups of the last word are padded with exponent 127 (1.0)."""
    if scales.dtype != torch.float32:
        raise TypeError(f"scales must be float32, got {scales.dtype}")
    bits = scales.contiguous().view(torch.int32)
    if bool(((bits < 0) | ((bits & 0x7FFFFF) != 0)).any()):
        raise ValueError("pack_ue8m0 needs positive power-of-two scales (round them with round_scale_ue8m0 first)")
    exponents = (bits >> 23).to(torch.uint8)
    groups = exponents.shape[-1]
    pad = (-groups) % 4
    if pad:
        exponents = torch.nn.functional.pad(exponents, (0, pad), value=127)
    return exponents.contiguous().view(torch.int32)


def unpack_ue8m0(packed: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Inverse of ``pack_ue8m0``: int32 ``[..., ceil(G/4)]`` -> fp32 ``[..., num_groups]``."""
    if packed.dtype != torch.int32:
        raise TypeError(f"packed scales must be int32, got {packed.dtype}")
    if packed.shape[-1] * 4 < num_groups:
        raise ValueError(f"packed scales hold {packed.shape[-1] * 4} groups, fewer than num_groups={num_groups}")
    exponents = packed.contiguous().view(torch.uint8)[..., :num_groups]
    return (exponents.to(torch.int32) << 23).view(torch.float32)


def ll_scales_to_standard(scales: torch.Tensor, hidden_size: int) -> torch.Tensor:
    """Low-latency dispatch scales as fp32 ``[E_local, T, hidden/128]``.

    DeepEP returns ``[E_local, T, hidden/128]`` fp32, or, with ``use_ue8m0``, int32 ``[E_local, T,
    hidden/512]``; both have column-major last two dimensions (strides ``(T*G, 1, T)``) for TMA. Packed
    scales are unpacked; the column-major layout is kept (consumers read through strides).
    """
    groups = hidden_size // DEEPEP_GROUP
    if scales.dtype == torch.float32:
        if scales.shape[-1] != groups:
            raise ValueError(f"fp32 scales must have {groups} groups, got shape {tuple(scales.shape)}")
        return scales
    return unpack_ue8m0(scales, groups)


def column_major_batched(scales: torch.Tensor) -> torch.Tensor:
    """Copy ``[E, T, G]`` scales into the column-major (strides ``(T*G, 1, T)``) layout DeepEP produces."""
    if scales.dim() != 3:
        raise ValueError(f"scales must be [E, T, G], got shape {tuple(scales.shape)}")
    return scales.transpose(1, 2).contiguous().transpose(1, 2)


# ---- buffers ---------------------------------------------------------------------------------------------


@dataclass
class _CachedBuffer:
    buffer: Any
    group: Any
    num_nvl_bytes: int
    num_rdma_bytes: int
    num_qps_per_rank: int


_BUFFERS: dict[tuple[int, str], _CachedBuffer] = {}
_LOCK = threading.Lock()


def check_group(group: Any, parallel: ParallelConfig) -> EPGroup:
    """The EP group DeepEP will run on (``group``: ProcessGroup, ``EPGroup`` or None = the world).

    It must be an NCCL group on CUDA whose size and this process's rank match ``parallel``.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise DeepEPUnavailableError(
            "DeepEP needs torch.distributed initialized with the NCCL backend (e.g. torchrun + "
            "moe_plugin.distributed.init_distributed('nccl')); pass group= or initialize the default group first"
        )
    ep = group if isinstance(group, EPGroup) else EPGroup.from_group(group)
    if "nccl" not in ep.backend.lower():
        raise DeepEPUnavailableError(
            f"DeepEP needs a GPU process group with the NCCL backend, got backend {ep.backend!r} "
            "(the all2all prepare/finalize backend serves gloo / CPU groups)"
        )
    if not torch.cuda.is_available():
        raise DeepEPUnavailableError("DeepEP needs CUDA GPUs")
    if ep.world_size != parallel.ep_size or ep.rank != parallel.ep_rank:
        raise ValueError(
            f"the EP process group has {ep.world_size} ranks and this process is rank {ep.rank}, but the "
            f"config says ep_size={parallel.ep_size} ep_rank={parallel.ep_rank}"
        )
    return ep


def process_group(ep: EPGroup) -> Any:
    """The ProcessGroup object ``deep_ep.Buffer`` takes (the world group when ``ep.group`` is None)."""
    import torch.distributed as dist

    return ep.group if ep.group is not None else dist.group.WORLD


def ht_buffer_bytes(deep_ep: Any, world_size: int, hidden_bytes: int) -> tuple[int, int]:
    """NVLink and RDMA bytes DeepEP recommends for high-throughput dispatch and combine of rows of
    ``hidden_bytes`` at ``world_size`` ranks (the larger of the two configs' hints)."""
    nvl = rdma = 0
    for cfg in (deep_ep.Buffer.get_dispatch_config(world_size), deep_ep.Buffer.get_combine_config(world_size)):
        nvl = max(nvl, int(cfg.get_nvl_buffer_size_hint(hidden_bytes, world_size)))
        # Intranode needs no RDMA buffer, and a DeepEP built without NVSHMEM asserts on the RDMA hint.
        if world_size > max(HT_INTRANODE_RANKS):
            rdma = max(rdma, int(cfg.get_rdma_buffer_size_hint(hidden_bytes, world_size)))
    return nvl, rdma


def get_buffer(
    group: Any,
    mode: str,
    *,
    num_nvl_bytes: int,
    num_rdma_bytes: int,
    num_qps_per_rank: int = 1,
) -> Any:
    """The cached ``deep_ep.Buffer`` of (``group``, ``mode``), created or grown to at least these sizes.

    ``mode`` is ``"ht"`` or ``"ll"`` (a low-latency buffer). Creating a buffer is collective: every rank of
    the group must call this with the same sizes in the same order, which holds when every rank builds the
    same layers.
    """
    if mode not in ("ht", "ll"):
        raise ValueError(f"mode must be 'ht' or 'll', got {mode!r}")
    deep_ep = import_deep_ep()
    key = (id(group), mode)  # the cache entry keeps the group alive, so its id stays unique
    with _LOCK:
        cached = _BUFFERS.get(key)
        if (
            cached is not None
            and cached.num_nvl_bytes >= num_nvl_bytes
            and cached.num_rdma_bytes >= num_rdma_bytes
            and cached.num_qps_per_rank >= num_qps_per_rank
        ):
            return cached.buffer
        if cached is not None:
            num_nvl_bytes = max(num_nvl_bytes, cached.num_nvl_bytes)
            num_rdma_bytes = max(num_rdma_bytes, cached.num_rdma_bytes)
            num_qps_per_rank = max(num_qps_per_rank, cached.num_qps_per_rank)
            _destroy(cached)
            del _BUFFERS[key]
        logger.info(
            "moe_plugin: creating deep_ep.Buffer(%s) nvl=%d MiB rdma=%d MiB qps_per_rank=%d",
            mode,
            num_nvl_bytes >> 20,
            num_rdma_bytes >> 20,
            num_qps_per_rank,
        )
        buffer = _make_buffer(deep_ep, group, mode, num_nvl_bytes, num_rdma_bytes, num_qps_per_rank)
        _BUFFERS[key] = _CachedBuffer(buffer, group, num_nvl_bytes, num_rdma_bytes, num_qps_per_rank)
        return buffer


def _make_buffer(deep_ep: Any, group: Any, mode: str, nvl: int, rdma: int, qps: int) -> Any:
    kwargs: dict[str, Any] = dict(low_latency_mode=(mode == "ll"), num_qps_per_rank=qps)
    # Explicit destruction: DeepEP warns that releasing in the destructor can hang interpreter shutdown.
    try:
        return deep_ep.Buffer(group, nvl, rdma, explicitly_destroy=True, **kwargs)
    except TypeError:  # releases before explicitly_destroy existed
        return deep_ep.Buffer(group, nvl, rdma, **kwargs)


def _destroy(cached: _CachedBuffer) -> None:
    destroy = getattr(cached.buffer, "destroy", None)
    if destroy is None or not getattr(cached.buffer, "explicitly_destroy", False):
        return
    try:
        destroy()
    except Exception as exc:  # shutting down: report, never raise from cleanup
        logger.warning("moe_plugin: deep_ep.Buffer.destroy() failed: %s", exc)


def release_buffers() -> int:
    """Destroy every cached DeepEP buffer (collective: call on every rank). Returns how many were released."""
    with _LOCK:
        entries = list(_BUFFERS.values())
        _BUFFERS.clear()
    for cached in entries:
        _destroy(cached)
    return len(entries)


def cached_buffer_count() -> int:
    return len(_BUFFERS)


def _release_at_exit() -> None:
    if _BUFFERS:
        release_buffers()


atexit.register(_release_at_exit)


# ---- chunk agreement ---------------------------------------------------------------------------------------


def agree_num_chunks(ep: EPGroup, num_chunks: int) -> int:
    """The largest chunk count of any rank of ``ep``: every rank must issue the same number of
    dispatch/combine pairs or the collective kernels wait forever.

    Inside CUDA-graph capture the host cannot read a reduced value; there every rank captures the same
    padded batch, so the local count is the agreed one.
    """
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return num_chunks
    return ep.all_reduce_max(num_chunks)


def quantize_for_dispatch(
    x: torch.Tensor, quant: QuantConfig, static_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """Quantize before a high-throughput dispatch when the scales travel per token.

    Returns ``(tokens, scales, quantized)``. Block and per-token FP8 are quantized here (FP8 bytes on the
    wire, scales ``[M, G]`` / ``[M, 1]``); per-tensor FP8 is left in bf16 (``quantized`` False) and
    quantized after the dispatch, because one scale for the whole tensor cannot be split across ranks.
    """
    from ..ops.scheme import quantize_activation

    if not quant.is_quantized:
        return x, None, False
    if quant.scheme is QuantScheme.FP8_W8A8 and (quant.block_shape is not None or quant.per_act_token):
        q, s = quantize_activation(x, quant, static_scale)
        # Explicit width: a rank with no tokens must still send [0, G] scales, or the ranks disagree on
        # the scale count per token and DeepEP's channels hang.
        groups = 1 if quant.block_shape is None else -(-x.shape[1] // quant.block_shape[1])
        return q.contiguous(), s.reshape(x.shape[0], groups).float().contiguous(), True
    return x, None, False


# ---- the backends' common part ---------------------------------------------------------------------------


class DeepEPPrepareAndFinalizeBase(AsyncPrepareAndFinalize):
    """The part of the DeepEP prepare/finalize backends that does not depend on the mode.

    Subclasses name the mode (``low_latency``, ``mode_name``), say which configs it cannot serve
    (``_mode_problems``) and how large a buffer it wants (``_buffer_sizes``).
    """

    required_modules = ("deep_ep",)
    low_latency: ClassVar[bool]
    mode_name: ClassVar[str]
    """``"high-throughput"`` or ``"low-latency"`` (error messages)."""

    def __init__(self, config: MoEConfig, group: Any = None):
        super().__init__(config.quant)
        self.config = config
        self.group = group
        self.world_size = config.parallel.ep_size
        self.physical = physical_expert_ids(config.num_experts, config.parallel)
        self.ep = None
        self._buffer_request: dict | None = None
        self._deep_ep: Any = None

    @classmethod
    @abstractmethod
    def _mode_problems(cls, config: MoEConfig) -> list[str]:
        """Every reason this mode's kernels cannot serve ``config`` (empty when they can)."""

    @abstractmethod
    def _buffer_sizes(self) -> dict:
        """``get_buffer``'s arguments other than the group (``self._deep_ep`` is imported)."""

    @classmethod
    def supports(cls, config: MoEConfig, caps: Any) -> tuple[bool, str]:
        if not config.parallel.use_ep:
            return False, "ep_size=1: nothing to dispatch (DeepEP serves expert parallelism)"
        problems = capability_problems(caps, config, low_latency=cls.low_latency) or cls._mode_problems(config)
        return (False, "; ".join(problems)) if problems else (True, "")

    def _resolve_group(self) -> "DeepEPPrepareAndFinalizeBase":
        # At construction, so that a gloo / mismatched group fails there, not mid-forward.
        self.ep = check_group(self.group, self.config.parallel)
        return self

    @property
    def num_dispatchers(self) -> int:
        return self.world_size

    def agree_num_chunks(self, num_chunks: int, device: torch.device) -> int:
        self._ensure_buffer()
        return agree_num_chunks(self.ep, num_chunks)

    def _ensure_buffer(self) -> Any:
        """This layer's buffer, from the shared cache every call: another layer may have grown (replaced)
        it since."""
        if self._buffer_request is None:
            self._deep_ep = import_deep_ep()
            if self.ep is None:
                self.ep = check_group(self.group, self.config.parallel)
            self._buffer_request = dict(group=process_group(self.ep), **self._buffer_sizes())
        return get_buffer(**self._buffer_request)

    def check_inputs(self, hidden_states, topk_weights, topk_ids, *, num_experts, expert_map) -> None:
        self._check_hidden_states(hidden_states)
        self._check_num_experts(num_experts)

    def _check_hidden_states(self, hidden_states: torch.Tensor) -> None:
        if hidden_states.device.type != "cuda":
            raise ValueError(f"DeepEP dispatches CUDA tensors, hidden_states is on {hidden_states.device}")
        if hidden_states.dtype != torch.bfloat16:
            raise TypeError(f"DeepEP {self.mode_name} mode needs bfloat16 hidden_states, got {hidden_states.dtype}")

    def _check_num_experts(self, num_experts: int) -> None:
        if num_experts != self.config.num_experts:
            raise ValueError(f"num_experts={num_experts} differs from the config's {self.config.num_experts}")
