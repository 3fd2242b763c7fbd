"""The modular-kernel framework: two halves of an MoE layer and the combinator that joins them.

``PrepareAndFinalize`` moves tokens to the experts' owners (and back); ``PermuteExpertsUnpermute``
runs the experts. ``ModularKernel`` checks that a pair speaks the same activation format and quant
scheme, owns workspace allocation, chunks large batches, and runs shared experts beside the
communication. Neither half knows the other's concrete class.
"""

from __future__ import annotations

import enum
import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from .config import MoEConfig, QuantConfig
from .validation import check_moe_inputs


class ActivationFormat(str, enum.Enum):
    """The contract between the two halves."""

    STANDARD = "standard"
    """``a1 [M', K]`` plus ``topk_ids [M', k]`` in global ids (``expert_map`` maps them to local; id -1 or a
    map entry of -1 means the slot's expert lives elsewhere)."""
    BATCHED = "batched"
    """``a1 [E_local, max_tokens, K]`` plus ``expert_num_tokens [E_local]``; rows past the count are
    garbage and never read as data."""


@dataclass(frozen=True)
class ExpertTokensMetadata:
    """How many tokens each local expert received (Batched format, or as a hint for Standard)."""

    expert_num_tokens: torch.Tensor
    """``[E_local]`` int32 on the compute device."""
    expert_num_tokens_cpu: torch.Tensor | None = None
    """The same counts on the host when the prepare step already had them (saves a sync)."""


@dataclass
class ExpertWeights:
    """The expert weights in vLLM's layout: ``w1 [E_local, 2N, K]`` (gate rows then up rows; N rows for
    relu2) and ``w2 [E_local, K, N]``, with their scales when FP8."""

    w1: torch.Tensor
    w2: torch.Tensor
    w1_scale: torch.Tensor | None = None
    w2_scale: torch.Tensor | None = None
    a1_scale: torch.Tensor | None = None
    """Static per-tensor activation scale for GEMM1 (FP8 per-tensor); None = dynamic."""
    a2_scale: torch.Tensor | None = None
    """Static per-tensor activation scale for GEMM2 (FP8 per-tensor); None = dynamic."""

    @property
    def num_local_experts(self) -> int:
        return self.w1.shape[0]


@dataclass
class PreparedTokens:
    """What ``PrepareAndFinalize.prepare`` hands to the experts."""

    hidden_states: torch.Tensor
    """Standard: ``[M', K]``; Batched: ``[E_local, T, K]``. FP8 when the pair quantizes activations."""
    scale: torch.Tensor | None
    """Activation scales matching ``hidden_states`` (None when unquantized)."""
    topk_ids: torch.Tensor
    """``[M', k]`` int32 global expert ids of the tokens in ``hidden_states`` (Standard), or of the
    caller's tokens (Batched, where the experts do not read them)."""
    topk_weights: torch.Tensor
    """``[M', k]`` fp32 routing weights aligned with ``topk_ids``."""
    expert_tokens_meta: ExpertTokensMetadata | None = None
    handle: Any = None
    """Backend-private bookkeeping that ``finalize`` needs (send counts, slot maps...)."""


@dataclass(frozen=True)
class WorkspaceShapes:
    """Scratch and output shapes an experts backend needs for one call."""

    workspace13: tuple[int, ...]
    """Scratch shared by GEMM1's output and GEMM2's output when the two never live at once."""
    workspace2: tuple[int, ...]
    """Scratch for the activation output (GEMM2's input)."""
    output: tuple[int, ...]
    """Shape of the experts' result: ``[M', K]`` (reduced), ``[M', k, K]`` (per slot) or
    ``[E_local, T, K]`` (Batched)."""


class TopKWeightAndReduce(ABC):
    """Strategy that turns the experts' output into ``[M, K]``: weight by the routing weights, sum over k."""

    @abstractmethod
    def apply(
        self,
        output: torch.Tensor,
        fused_expert_output: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        apply_router_weight_on_input: bool,
    ) -> torch.Tensor:
        """Write the ``[M, K]`` result into ``output`` and return it."""


class WeightAndReduceNoOp(TopKWeightAndReduce):
    """The experts already weighted and reduced: ``fused_expert_output`` is ``[M, K]``."""

    def apply(self, output, fused_expert_output, topk_weights, topk_ids, apply_router_weight_on_input):
        if fused_expert_output.data_ptr() != output.data_ptr():
            output.copy_(fused_expert_output.view(output.shape))
        return output

    def __repr__(self) -> str:
        return "WeightAndReduceNoOp()"


class WeightAndReduceContiguous(TopKWeightAndReduce):
    """``fused_expert_output`` is ``[M, k, K]`` (or ``[M*k, K]``), one row per routed slot; slots whose
    expert lives elsewhere hold zeros. Accumulates in fp32."""

    def apply(self, output, fused_expert_output, topk_weights, topk_ids, apply_router_weight_on_input):
        m, k = topk_weights.shape
        per_slot = fused_expert_output.view(m, k, output.shape[-1]).float()  # explicit width: m may be 0
        if not apply_router_weight_on_input:
            per_slot = per_slot * topk_weights.view(m, k, 1).float()
        output.copy_(per_slot.sum(dim=1))
        return output

    def __repr__(self) -> str:
        return "WeightAndReduceContiguous()"


class WeightAndReduceDelegate(TopKWeightAndReduce):
    """The experts leave the choice to the prepare/finalize backend, which knows its own layout."""

    def apply(self, output, fused_expert_output, topk_weights, topk_ids, apply_router_weight_on_input):
        raise RuntimeError(
            "WeightAndReduceDelegate must be resolved by the PrepareAndFinalize backend before use"
        )

    def __repr__(self) -> str:
        return "WeightAndReduceDelegate()"


class PrepareAndFinalize(ABC):
    """Quantize and dispatch tokens to the owners of their experts; combine the results back.

    Subclasses declare ``activation_format`` and, for the oracle, ``required_modules`` and
    ``supports(config, caps)``.
    """

    name: ClassVar[str] = "?"
    activation_format: ClassVar[ActivationFormat] = ActivationFormat.STANDARD
    required_modules: ClassVar[tuple[str, ...]] = ()
    experts_rows_are_caller_tokens: ClassVar[bool] = False
    """True when prepare hands the experts the caller's own tokens in order (no communication, no
    reordering): experts that weight and reduce themselves may then write straight into the output."""
    num_local_experts: int | None = None
    """Local experts the backend lays its buffers out for (None: whatever the weights hold);
    ``ModularKernel`` refuses weights with another count."""
    can_leave_quant_to_experts: ClassVar[bool] = False
    """True when prepare sends nothing over a wire, so activations need not be quantized before it. Such a
    backend's ``prepare`` takes a keyword ``leave_quant_to_experts``: ``ModularKernel`` passes True when its
    experts quantize inside their permute (``quantizes_own_input``), and prepare then hands over the
    model-dtype tokens with no scale."""

    def __init__(self, quant: QuantConfig):
        self.quant = quant

    @classmethod
    def supports(cls, config: MoEConfig, caps: Any) -> tuple[bool, str]:
        """``(True, "")`` when this backend can serve ``config`` on a device with ``caps``."""
        return True, ""

    @property
    def num_dispatchers(self) -> int:
        """How many ranks send tokens to this one (sizes Batched buffers)."""
        return 1

    def max_num_tokens_per_rank(self) -> int | None:
        """Largest batch one call can take (Batched buffers); None = unbounded."""
        return None

    def agree_num_chunks(self, num_chunks: int, device: torch.device) -> int:
        """Every rank of an EP group must run the same number of chunks (collectives would deadlock);
        EP backends override this with a max-reduction over the group."""
        return num_chunks

    def check_inputs(
        self,
        hidden_states: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        *,
        num_experts: int,
        expert_map: torch.Tensor | None,
    ) -> None:
        """Raise ``ValueError`` / ``TypeError`` for inputs ``prepare`` would refuse. ``ModularKernel`` calls
        it before any collective, so that a rank with bad inputs can tell its peers instead of leaving them
        waiting; backends whose ``prepare`` checks more than ``validation.check_moe_inputs`` override it."""

    @abstractmethod
    def prepare(
        self,
        hidden_states: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        *,
        num_experts: int,
        expert_map: torch.Tensor | None,
        apply_router_weight_on_input: bool,
        a1_scale: torch.Tensor | None,
    ) -> PreparedTokens:
        """Quantize (when ``self.quant`` asks) and dispatch ``hidden_states`` for this rank's experts."""

    def prepare_async(self, *args, **kwargs) -> Callable[[], PreparedTokens]:
        """Start ``prepare`` and return a function that finishes it; backends whose collectives are
        asynchronous override this so shared experts run while tokens are in flight."""
        result = self.prepare(*args, **kwargs)
        return lambda: result

    @abstractmethod
    def finalize(
        self,
        output: torch.Tensor,
        fused_expert_output: torch.Tensor,
        prepared: PreparedTokens,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        *,
        apply_router_weight_on_input: bool,
        weight_and_reduce: TopKWeightAndReduce,
    ) -> None:
        """Weight, reduce over k and combine the experts' output into ``output [M, K]`` (caller's tokens)."""

    def finalize_async(self, *args, **kwargs) -> Callable[[], None]:
        self.finalize(*args, **kwargs)
        return lambda: None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(quant={self.quant.name})"


class AsyncPrepareAndFinalize(PrepareAndFinalize):
    """A ``PrepareAndFinalize`` whose collectives are asynchronous: subclasses implement ``prepare_async``
    and ``finalize_async`` (same arguments as ``prepare`` / ``finalize``); the blocking forms start one
    and wait for it."""

    @abstractmethod
    def prepare_async(self, *args, **kwargs) -> Callable[[], PreparedTokens]:
        """Start ``prepare``; the returned function waits for the transfer and returns its result."""

    @abstractmethod
    def finalize_async(self, *args, **kwargs) -> Callable[[], None]:
        """Start ``finalize``; the returned function waits for it and writes ``output``."""

    def prepare(self, hidden_states, topk_weights, topk_ids, **kwargs) -> PreparedTokens:
        return self.prepare_async(hidden_states, topk_weights, topk_ids, **kwargs)()

    def finalize(self, output, fused_expert_output, prepared, topk_weights, topk_ids, **kwargs) -> None:
        self.finalize_async(output, fused_expert_output, prepared, topk_weights, topk_ids, **kwargs)()


class PermuteExpertsUnpermute(ABC):
    """The experts: permute -> GEMM1 -> activation (+quant) -> GEMM2 -> unpermute.

    Subclasses declare their facts for the oracle as class attributes and ``supports``.
    """

    name: ClassVar[str] = "?"
    activation_format: ClassVar[ActivationFormat] = ActivationFormat.STANDARD
    required_modules: ClassVar[tuple[str, ...]] = ()
    supports_expert_map: ClassVar[bool] = True
    quantizes_own_input: ClassVar[bool] = False
    """True when ``apply`` also takes model-dtype activations (``a1q_scale`` None) under a dynamic FP8
    scheme and quantizes them while permuting, in one pass over the tokens it keeps."""

    def __init__(self, config: MoEConfig):
        self.config = config
        self.quant = config.quant

    @classmethod
    def supports(cls, config: MoEConfig, caps: Any) -> tuple[bool, str]:
        """``(True, "")`` when this backend can serve ``config`` on a device with ``caps``."""
        return True, ""

    @abstractmethod
    def workspace_shapes(
        self,
        num_tokens: int,
        n: int,
        k: int,
        top_k: int,
        global_num_experts: int,
        local_num_experts: int,
        expert_tokens_meta: ExpertTokensMetadata | None,
        activation: str,
    ) -> WorkspaceShapes:
        """Shapes for one call over ``num_tokens`` prepared rows (Standard) or ``num_tokens`` rows per
        expert (Batched). ``n`` is w1's row count (2N gated), ``k`` the hidden size."""

    @abstractmethod
    def weight_and_reduce(self) -> TopKWeightAndReduce:
        """Who weights and reduces the output (see ``TopKWeightAndReduce``)."""

    @abstractmethod
    def apply(
        self,
        output: torch.Tensor,
        hidden_states: torch.Tensor,
        weights: ExpertWeights,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        *,
        activation: str,
        global_num_experts: int,
        expert_map: torch.Tensor | None,
        a1q_scale: torch.Tensor | None,
        workspace13: torch.Tensor,
        workspace2: torch.Tensor,
        expert_tokens_meta: ExpertTokensMetadata | None,
        apply_router_weight_on_input: bool,
    ) -> None:
        """Compute the experts into ``output`` (shape ``workspace_shapes(...).output``)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(quant={self.quant.name})"


_REJECTED_CHUNKS = 1 << 40
"""The chunk count a rank with bad inputs brings to the agreement (a max over the group): far above any
real one, so every rank learns of the rejection from the same collective."""


class WorkspaceCache:
    """Grow-only scratch buffers keyed by (device, dtype), at most ``max_entries`` kept (LRU).

    Kernels see views into the same storage call after call, which keeps them CUDA-graph-safe and
    avoids allocator churn.
    """

    def __init__(self, max_entries: int = 4):
        self.max_entries = max_entries
        self._buffers: OrderedDict[tuple[str, torch.device, torch.dtype], torch.Tensor] = OrderedDict()

    def get(self, role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        key = (role, device, dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, 1), dtype=dtype, device=device)
            self._buffers[key] = buf
        self._buffers.move_to_end(key)
        while len(self._buffers) > self.max_entries * 3:
            self._buffers.popitem(last=False)
        return buf[:numel].view(shape)

    @property
    def num_buffers(self) -> int:
        return len(self._buffers)

    def storage_ptrs(self) -> list[int]:
        return [b.data_ptr() for b in self._buffers.values()]


class ModularKernel:
    """``prepare -> experts -> finalize``, validated once at construction."""

    def __init__(
        self,
        prepare_finalize: PrepareAndFinalize,
        experts: PermuteExpertsUnpermute,
        shared_experts: Callable[[torch.Tensor], torch.Tensor] | None = None,
        *,
        chunk_size: int | None = None,
    ):
        if not isinstance(prepare_finalize, PrepareAndFinalize):
            raise TypeError(
                f"prepare_finalize must be a PrepareAndFinalize, got {type(prepare_finalize).__name__}"
            )
        if not isinstance(experts, PermuteExpertsUnpermute):
            raise TypeError(f"experts must be a PermuteExpertsUnpermute, got {type(experts).__name__}")
        if prepare_finalize.activation_format != experts.activation_format:
            raise ValueError(
                f"activation format mismatch: {type(prepare_finalize).__name__} produces "
                f"{prepare_finalize.activation_format.value}, {type(experts).__name__} consumes "
                f"{experts.activation_format.value}"
            )
        if prepare_finalize.quant != experts.quant:
            raise ValueError(
                f"quant scheme mismatch: {type(prepare_finalize).__name__} prepares {prepare_finalize.quant}, "
                f"{type(experts).__name__} expects {experts.quant}"
            )
        if chunk_size is None:
            chunk_size = experts.config.chunk_size
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        cap = prepare_finalize.max_num_tokens_per_rank()
        if cap is not None:
            chunk_size = min(chunk_size, cap)
        # Decided per kernel and passed on each call: a prepare instance may serve kernels whose experts differ.
        self.quantize_in_experts = bool(
            experts.quantizes_own_input and prepare_finalize.can_leave_quant_to_experts and experts.quant.is_quantized
        )
        self.prepare_finalize = prepare_finalize
        self.experts = experts
        self.shared_experts = shared_experts
        self.chunk_size = chunk_size
        self.workspaces = WorkspaceCache()

    @property
    def config(self) -> MoEConfig:
        return self.experts.config

    def describe(self) -> str:
        return f"{self.prepare_finalize.name} + {self.experts.name} ({self.experts.quant.name})"

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.forward(*args, **kwargs)

    def forward(
        self,
        hidden_states: torch.Tensor,
        weights: ExpertWeights,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        *,
        activation: str | None = None,
        global_num_experts: int | None = None,
        expert_map: torch.Tensor | None = None,
        apply_router_weight_on_input: bool = False,
        inplace: bool = False,
        shared_experts_input: torch.Tensor | None = None,
        check_inputs: bool = True,
    ) -> torch.Tensor:
        """Run the layer's experts on ``hidden_states [M, K]``; returns ``[M, K]`` (plus the shared
        experts' output when the kernel has shared experts). ``check_inputs=False`` skips validation for
        callers that already validated (ids must then be int32 and weights fp32)."""
        activation = self.config.activation if activation is None else activation
        if global_num_experts is None:
            global_num_experts = self.config.num_experts
        # A rank whose inputs are bad must not raise alone: its EP peers would wait for it in the first
        # collective until the timeout. It joins the chunk-count agreement with a marker count instead,
        # so every rank raises (this one with its own error).
        rejected: Exception | None = None
        try:
            if check_inputs:
                topk_weights, topk_ids = check_moe_inputs(
                    hidden_states,
                    weights,
                    topk_weights,
                    topk_ids,
                    activation=activation,
                    global_num_experts=global_num_experts,
                    expert_map=expert_map,
                    quant=self.experts.quant,
                    apply_router_weight_on_input=apply_router_weight_on_input,
                )
                self.prepare_finalize.check_inputs(
                    hidden_states, topk_weights, topk_ids, num_experts=global_num_experts, expert_map=expert_map
                )
            if not self.experts.supports_expert_map and expert_map is not None:
                raise ValueError(f"{type(self.experts).__name__} does not support expert_map")
            if shared_experts_input is not None and (
                not isinstance(shared_experts_input, torch.Tensor)
                or shared_experts_input.dim() != 2
                or shared_experts_input.shape[0] != hidden_states.shape[0]
            ):
                raise ValueError(
                    f"shared_experts_input must be [M={hidden_states.shape[0]}, K'] like hidden_states' rows, got "
                    f"{tuple(getattr(shared_experts_input, 'shape', ())) or type(shared_experts_input).__name__}"
                )
            laid_out = self.prepare_finalize.num_local_experts
            if laid_out is not None and weights.num_local_experts != laid_out:
                raise ValueError(
                    f"weights hold {weights.num_local_experts} local experts (w1.shape[0]) but "
                    f"{type(self.prepare_finalize).__name__} was built for num_local_experts={laid_out}"
                )
        except (ValueError, TypeError) as exc:
            rejected = exc
        device = hidden_states.device if isinstance(hidden_states, torch.Tensor) else torch.device("cpu")
        local_chunks = _REJECTED_CHUNKS if rejected else max(1, math.ceil(hidden_states.shape[0] / self.chunk_size))
        num_chunks = self.prepare_finalize.agree_num_chunks(local_chunks, device)
        if rejected is not None:
            raise rejected
        if num_chunks >= _REJECTED_CHUNKS:
            raise ValueError(
                "another rank of the expert-parallel group rejected its MoE inputs (its error names the "
                "problem); no rank dispatched"
            )
        m = hidden_states.shape[0]
        out_dtype = hidden_states.dtype
        output = hidden_states if inplace else torch.empty_like(hidden_states)
        shared_out = None
        for chunk in range(num_chunks):
            start = min(chunk * self.chunk_size, m)
            end = min(start + self.chunk_size, m)
            chunk_shared = self._run_chunk(
                output[start:end],
                hidden_states[start:end],
                weights,
                topk_weights[start:end],
                topk_ids[start:end],
                activation=activation,
                global_num_experts=global_num_experts,
                expert_map=expert_map,
                apply_router_weight_on_input=apply_router_weight_on_input,
                shared_input=(
                    None
                    if self.shared_experts is None or chunk > 0
                    else (hidden_states if shared_experts_input is None else shared_experts_input)
                ),
            )
            if chunk_shared is not None:
                shared_out = chunk_shared
        if shared_out is not None:
            output.add_(shared_out.to(out_dtype))
        return output

    def _run_chunk(
        self,
        output: torch.Tensor,
        hidden_states: torch.Tensor,
        weights: ExpertWeights,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        *,
        activation: str,
        global_num_experts: int,
        expert_map: torch.Tensor | None,
        apply_router_weight_on_input: bool,
        shared_input: torch.Tensor | None,
    ) -> torch.Tensor | None:
        pf, experts = self.prepare_finalize, self.experts
        deferred = {"leave_quant_to_experts": True} if self.quantize_in_experts else {}
        receive = pf.prepare_async(
            hidden_states,
            topk_weights,
            topk_ids,
            num_experts=global_num_experts,
            expert_map=expert_map,
            apply_router_weight_on_input=apply_router_weight_on_input,
            a1_scale=weights.a1_scale,
            **deferred,
        )
        # Shared experts run while the dispatch is in flight (when the backend is asynchronous).
        shared_out = self.shared_experts(shared_input) if shared_input is not None else None
        prepared = receive()

        a1q = prepared.hidden_states
        # Workspaces and the experts' output are in the model dtype, also when activations travel as FP8.
        work_dtype = output.dtype
        rows = a1q.shape[1] if experts.activation_format is ActivationFormat.BATCHED else a1q.shape[0]
        shapes = experts.workspace_shapes(
            rows,
            weights.w1.shape[1],
            weights.w2.shape[1],
            prepared.topk_ids.shape[1],
            global_num_experts,
            weights.num_local_experts,
            prepared.expert_tokens_meta,
            activation,
        )
        device = a1q.device
        workspace13 = self.workspaces.get("workspace13", shapes.workspace13, work_dtype, device)
        workspace2 = self.workspaces.get("workspace2", shapes.workspace2, work_dtype, device)
        weight_and_reduce = experts.weight_and_reduce()
        direct = (
            pf.experts_rows_are_caller_tokens
            and isinstance(weight_and_reduce, WeightAndReduceNoOp)
            and tuple(shapes.output) == tuple(output.shape)
            # in place, the output aliases the experts' input
            and output.data_ptr() != hidden_states.data_ptr()
        )
        if direct:
            fused_out = output  # saves an [M, K] copy; finalize's NoOp sees the same storage
        else:
            fused_out = self.workspaces.get("output", shapes.output, work_dtype, device)

        experts.apply(
            fused_out,
            a1q,
            weights,
            prepared.topk_weights,
            prepared.topk_ids,
            activation=activation,
            global_num_experts=global_num_experts,
            expert_map=expert_map,
            a1q_scale=prepared.scale,
            workspace13=workspace13,
            workspace2=workspace2,
            expert_tokens_meta=prepared.expert_tokens_meta,
            apply_router_weight_on_input=apply_router_weight_on_input,
        )
        finish = pf.finalize_async(
            output,
            fused_out,
            prepared,
            topk_weights,
            topk_ids,
            apply_router_weight_on_input=apply_router_weight_on_input,
            weight_and_reduce=weight_and_reduce,
        )
        finish()
        return shared_out
