"""``FusedMoE``: an MoE layer as an ``nn.Module`` -- routing, shared experts, the oracle's ModularKernel and
weight loading for the experts this rank owns."""

from __future__ import annotations

import itertools
import logging
import operator
import re
import weakref
from typing import Iterable, Mapping

import torch
from torch import nn

from .config import FP8_DTYPE, MoEConfig
from .distributed import build_expert_map, local_expert_ids
from .modular import ExpertWeights, ModularKernel
from .routing import fused_topk, grouped_topk
from .validation import expected_scale_shape

logger = logging.getLogger(__name__)

# HF per-expert names: Qwen/DeepSeek use gate_proj/up_proj/down_proj, Mixtral w1 (gate), w3 (up), w2 (down).
_PER_EXPERT = re.compile(r"(?:^|\.)experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.(weight|weight_scale_inv|weight_scale)$")
_ROLE = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}

# Layers are reached from the custom op by name, so compiled graphs hold a string, not a module.
_LAYERS: "weakref.WeakValueDictionary[str, FusedMoE]" = weakref.WeakValueDictionary()
_LAYER_IDS = itertools.count()


@torch.library.custom_op("moe_plugin::moe_layer_forward", mutates_args=())
def _moe_layer_forward(hidden_states: torch.Tensor, router_logits: torch.Tensor, layer_name: str) -> torch.Tensor:
    return _LAYERS[layer_name]._forward_impl(hidden_states, router_logits)


@_moe_layer_forward.register_fake
def _(hidden_states, router_logits, layer_name):
    return torch.empty_like(hidden_states)


class FusedMoE(nn.Module):
    """A Mixture-of-Experts layer.

    ``forward(hidden_states, router_logits=None)``: routes with ``fused_topk`` (or ``grouped_topk``),
    runs the routed experts through the oracle's ``ModularKernel`` and adds the shared experts' output.
    Router logits come from the caller, or from the layer's own ``gate`` when ``with_gate=True``.

    Expert weights are created for the local experts only (``config.parallel``): ``w13_weight
    [E_local, 2N, K]`` (gate rows then up rows), ``w2_weight [E_local, K, N]``, plus ``*_scale`` for FP8.
    """

    def __init__(
        self,
        config: MoEConfig,
        *,
        renormalize: bool = True,
        scoring_func: str = "softmax",
        use_grouped_topk: bool = False,
        num_expert_group: int = 0,
        topk_group: int = 0,
        routed_scaling_factor: float = 1.0,
        use_correction_bias: bool = False,
        with_gate: bool = False,
        shared_experts: nn.Module | None = None,
        apply_router_weight_on_input: bool = False,
        device: torch.device | str | None = None,
        experts_backend: str | None = None,
        prepare_finalize_backend: str | None = None,
        kernel: ModularKernel | None = None,
        **prepare_finalize_kwargs,
    ):
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
        self.config = config
        self.renormalize = renormalize
        self.scoring_func = scoring_func
        self.use_grouped_topk = use_grouped_topk
        self.num_expert_group = num_expert_group
        self.topk_group = topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.apply_router_weight_on_input = apply_router_weight_on_input
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.local_expert_ids = local_expert_ids(config.num_experts, config.parallel)
        e, k, n = config.num_local_experts, config.hidden_size, config.intermediate_size
        weight_dtype = FP8_DTYPE if config.quant.is_quantized else config.dtype
        self.w13_weight = nn.Parameter(torch.empty(e, config.w1_rows, k, dtype=weight_dtype, device=device), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(e, k, n, dtype=weight_dtype, device=device), requires_grad=False)
        if config.quant.is_quantized:
            s13 = expected_scale_shape(config.quant, e, config.w1_rows, k)
            s2 = expected_scale_shape(config.quant, e, k, n)
            self.w13_weight_scale = nn.Parameter(torch.ones(s13, dtype=torch.float32, device=device), requires_grad=False)
            self.w2_weight_scale = nn.Parameter(torch.ones(s2, dtype=torch.float32, device=device), requires_grad=False)
        else:
            self.w13_weight_scale = None
            self.w2_weight_scale = None
        # per-tensor FP8: each expert's gate and up scales as loaded (NaN = not yet), merged on first use
        self._w13_half_scales = torch.full((e, 2), float("nan"), dtype=torch.float32, device=device)
        self._pending_requant: set[int] = set()
        expert_map = build_expert_map(config.num_experts, config.parallel, device)
        self.register_buffer("expert_map", expert_map, persistent=False)
        self.gate = nn.Linear(k, config.num_experts, bias=False, dtype=config.dtype, device=device) if with_gate else None
        if self.gate is not None:
            # Inference module (the custom op has no backward): like the expert weights, not trainable.
            self.gate.weight.requires_grad_(False)
        if use_correction_bias:
            self.e_score_correction_bias = nn.Parameter(
                torch.zeros(config.num_experts, dtype=torch.float32, device=device), requires_grad=False
            )
        else:
            self.e_score_correction_bias = None
        self.shared_experts = shared_experts
        if kernel is None:
            from .oracle import select_kernel

            kernel = select_kernel(
                config,
                device,
                experts=experts_backend,
                prepare_finalize=prepare_finalize_backend,
                **prepare_finalize_kwargs,
            )
        if shared_experts is not None:
            kernel.shared_experts = shared_experts
        self.kernel = kernel
        self.layer_name = f"moe_plugin.FusedMoE.{next(_LAYER_IDS)}"
        _LAYERS[self.layer_name] = self
        self.register_state_dict_pre_hook(_merge_pending_scales)

    def __setstate__(self, state) -> None:
        # A copy (copy.deepcopy, unpickling) is a layer of its own: the custom op must reach it by a name
        # of its own, not the original's.
        super().__setstate__(state)
        self.layer_name = f"moe_plugin.FusedMoE.{next(_LAYER_IDS)}"
        _LAYERS[self.layer_name] = self

    # ---- forward ---------------------------------------------------------------------------------
    def route(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grouped = self.use_grouped_topk
        if grouped or self.e_score_correction_bias is not None:
            # Without grouping, bias-corrected selection over all experts is grouped top-k with one group.
            return grouped_topk(
                hidden_states,
                router_logits,
                self.config.top_k,
                self.renormalize,
                num_expert_group=self.num_expert_group if grouped else 1,
                topk_group=self.topk_group if grouped else 1,
                scoring_func=self.scoring_func,
                routed_scaling_factor=self.routed_scaling_factor,
                e_score_correction_bias=self.e_score_correction_bias,
            )
        weights, ids = fused_topk(hidden_states, router_logits, self.config.top_k, self.renormalize, self.scoring_func)
        if self.routed_scaling_factor != 1.0:
            weights = weights * self.routed_scaling_factor
        return weights, ids

    def expert_weights(self) -> ExpertWeights:
        return ExpertWeights(self.w13_weight, self.w2_weight, self.w13_weight_scale, self.w2_weight_scale)

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden_states [..., K]`` -> ``[..., K]``. Runs as the custom op ``moe_plugin::moe_layer_forward``
        so torch.compile sees one opaque call instead of the data-dependent routing inside."""
        if not isinstance(hidden_states, torch.Tensor):
            raise TypeError(f"hidden_states must be a torch.Tensor [..., {self.config.hidden_size}], got {type(hidden_states).__name__}")
        if hidden_states.dim() == 0 or hidden_states.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"hidden_states must have shape [..., {self.config.hidden_size}] (hidden_size), got {tuple(hidden_states.shape)}"
            )
        if self._pending_requant:
            self.finalize_weights()
        shape = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, shape[-1])
        if router_logits is None:
            if self.gate is None:
                raise ValueError("router_logits is required when the layer was built without with_gate=True")
            router_logits = self.gate(hidden_states)
        if not isinstance(router_logits, torch.Tensor):
            raise TypeError(f"router_logits must be a torch.Tensor, got {type(router_logits).__name__}")
        m, e = hidden_states.shape[0], self.config.num_experts
        if router_logits.shape[-1] != e or router_logits.numel() != m * e:
            raise ValueError(
                f"router_logits must hold [{m}, {e}] (one score per token per global expert), "
                f"got shape {tuple(router_logits.shape)}"
            )
        router_logits = router_logits.reshape(m, e)
        return torch.ops.moe_plugin.moe_layer_forward(hidden_states, router_logits, self.layer_name).reshape(shape)

    def _forward_impl(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = self.route(hidden_states, router_logits)
        return self.kernel(
            hidden_states,
            self.expert_weights(),
            topk_weights,
            topk_ids,
            activation=self.config.activation,
            global_num_experts=self.config.num_experts,
            expert_map=self.expert_map,
            apply_router_weight_on_input=self.apply_router_weight_on_input,
        )

    # ---- weight loading --------------------------------------------------------------------------
    def _local_index(self, global_id: int) -> int | None:
        # bool is an int to Python (and a bool tensor converts), but True as an expert id is a caller's
        # mistake, not expert 1
        if isinstance(global_id, bool) or (isinstance(global_id, torch.Tensor) and global_id.dtype == torch.bool):
            raise TypeError(f"expert id must be an int, got bool {global_id!r}")
        try:
            global_id = operator.index(global_id)
        except TypeError:
            raise TypeError(f"expert id must be an int, got {type(global_id).__name__} {global_id!r}") from None
        if not 0 <= global_id < self.config.num_experts:
            raise ValueError(f"expert id {global_id} out of range [0, {self.config.num_experts})")
        if self.expert_map is None:
            return global_id
        local = int(self.expert_map[global_id])
        return local if local >= 0 else None

    def _check_shape(self, name: str, tensor: torch.Tensor, want: tuple[int, ...]) -> None:
        _check_float_tensor(name, tensor, tuple(want))
        # An FP8 layer given 16-bit weights would cast them with an implied scale of 1: refuse instead.
        if self.config.quant.is_quantized and not name.endswith("scale") and tensor.dtype != FP8_DTYPE:
            raise TypeError(
                f"{name} must be float8_e4m3fn for the {self.config.quant.name} layer (with its scale), "
                f"got {tensor.dtype}"
            )

    @torch.no_grad()
    def load_expert(
        self,
        expert_id: int,
        *,
        gate: torch.Tensor | None = None,
        up: torch.Tensor | None = None,
        down: torch.Tensor | None = None,
        gate_scale: torch.Tensor | None = None,
        up_scale: torch.Tensor | None = None,
        down_scale: torch.Tensor | None = None,
    ) -> bool:
        """Load one expert from HF-style projections (``gate``/``up`` ``[N, K]``, ``down`` ``[K, N]``; for
        relu2 ``up`` carries the only input projection). Returns False when another rank owns it."""
        local = self._local_index(expert_id)
        if local is None:
            return False
        cfg = self.config
        n, k = cfg.intermediate_size, cfg.hidden_size
        gated = cfg.w1_rows == 2 * n
        quant = cfg.quant
        if gate is not None:
            if not gated:
                raise ValueError(f"activation {cfg.activation!r} has no gate projection")
            self._check_shape(f"experts.{expert_id}.gate", gate, (n, k))
            self.w13_weight[local, :n].copy_(gate)
        if up is not None:
            self._check_shape(f"experts.{expert_id}.up", up, (n, k))
            (self.w13_weight[local, n:] if gated else self.w13_weight[local]).copy_(up)
        if down is not None:
            self._check_shape(f"experts.{expert_id}.down", down, (k, n))
            self.w2_weight[local].copy_(down)
        for part, scale in (("gate", gate_scale), ("up", up_scale), ("down", down_scale)):
            if scale is None:
                continue
            if not quant.is_quantized:
                raise ValueError(f"experts.{expert_id}.{part} scale given but the layer is unquantized")
            self._load_scale(expert_id, local, part, scale, gated)
        return True

    def _load_scale(self, expert_id: int, local: int, part: str, scale: torch.Tensor, gated: bool) -> None:
        _check_float_tensor(f"experts.{expert_id}.{part} scale", scale)
        quant = self.config.quant
        per_tensor = quant.block_shape is None and not quant.per_act_token
        if part == "down":
            target = self.w2_weight_scale[local]
        elif per_tensor:
            target = self.w13_weight_scale[local]
        elif not gated:
            target = self.w13_weight_scale[local]
        else:
            n = self.config.intermediate_size
            block_n = quant.block_shape[0] if quant.block_shape is not None else 1
            if n % block_n:
                raise ValueError(
                    f"experts.{expert_id}.{part} scale: with intermediate size {n} not a multiple of the "
                    f"{block_n}-row scale block, gate and up share a block; load the stacked w13_weight_scale "
                    f"[E, {self.w13_weight_scale.shape[1]}, {self.w13_weight_scale.shape[2]}] instead"
                )
            half = self.w13_weight_scale.shape[1] // 2
            target = self.w13_weight_scale[local, :half] if part == "gate" else self.w13_weight_scale[local, half:]
        if quant.block_shape is not None and tuple(scale.shape) != tuple(target.shape):
            # A transposed [cols, rows] block grid has the right count: only the exact shape is safe.
            raise ValueError(
                f"experts.{expert_id}.{part} scale must have shape {tuple(target.shape)} for {quant.name}, "
                f"got {tuple(scale.shape)}"
            )
        if scale.numel() != target.numel():
            raise ValueError(
                f"experts.{expert_id}.{part} scale must hold {target.numel()} values (shape {tuple(target.shape)}) "
                f"for {quant.name}, got shape {tuple(scale.shape)}"
            )
        if per_tensor and part != "down" and gated:
            # Gate and up arrive with their own scales but share one per expert: remember both, and
            # requantize the half with the smaller scale to their max before the first forward.
            self._w13_half_scales[local, 0 if part == "gate" else 1] = scale.reshape(()).float()
            self._pending_requant.add(local)
            return
        target.copy_(scale.reshape(target.shape))

    @torch.compiler.disable
    def _requantize_per_tensor_w13(self) -> None:
        half = self.config.intermediate_size
        for local in sorted(self._pending_requant):
            scales = self._w13_half_scales[local]
            loaded = scales[~torch.isnan(scales)]
            shared = loaded.max()
            for index, rows in enumerate((slice(0, half), slice(half, 2 * half))):
                own = scales[index]
                if torch.isnan(own) or own == shared:
                    continue
                w = self.w13_weight[local, rows]
                w.copy_((w.float() * (own / shared)).to(w.dtype))
                scales[index] = shared
            self.w13_weight_scale[local].fill_(shared.item())
        self._pending_requant.clear()

    @torch.no_grad()
    def load_weights(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load from HF per-expert tensors (``...experts.{i}.gate_proj.weight``, ``up_proj``, ``down_proj``,
        or Mixtral's ``w1``/``w3``/``w2``; FP8 ``weight_scale_inv``) or stacked global tensors (``w13_weight
        [E, 2N, K]``, ``w2_weight [E, K, N]`` and their ``_scale``), plus ``gate.weight`` and
        ``e_score_correction_bias``. Returns the names consumed; tensors for other ranks' experts count
        as consumed."""
        if isinstance(weights, Mapping):
            items = weights.items()
        else:
            try:
                if isinstance(weights, (str, bytes, torch.Tensor)):
                    raise TypeError
                items = iter(weights)
            except TypeError:
                raise TypeError(
                    "weights must be a mapping of name -> tensor or an iterable of (name, tensor) pairs, "
                    f"got {type(weights).__name__}"
                ) from None
        loaded: set[str] = set()
        owned = torch.tensor(self.local_expert_ids, dtype=torch.long)
        for item in items:
            if not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[0], str):
                raise TypeError(f"weights must yield (name: str, tensor) pairs, got {item!r:.80}")
            name, tensor = item
            match = _PER_EXPERT.search(name)
            if match:
                expert, proj, kind = int(match.group(1)), _ROLE[match.group(2)], match.group(3)
                if kind == "weight":
                    self.load_expert(expert, **{proj: tensor})
                else:
                    self.load_expert(expert, **{f"{proj}_scale": tensor})
                loaded.add(name)
                continue
            leaf = name.rsplit(".", 1)[-1]
            stacked = {
                "w13_weight": self.w13_weight,
                "w2_weight": self.w2_weight,
                "w13_weight_scale": self.w13_weight_scale,
                "w2_weight_scale": self.w2_weight_scale,
            }
            if leaf in stacked and stacked[leaf] is not None:
                target = stacked[leaf]
                if not isinstance(tensor, torch.Tensor):
                    raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
                src = tensor[owned.to(tensor.device)] if tensor.dim() and tensor.shape[0] == self.config.num_experts else tensor
                self._check_shape(name, src, target.shape)
                target.copy_(src)
                loaded.add(name)
            elif (name == "gate.weight" or name.endswith(".gate.weight")) and self.gate is not None:
                # (exact leaf: Qwen2-MoE's ``shared_expert_gate.weight`` [1, K] is not the router)
                _check_float_tensor(name, tensor, tuple(self.gate.weight.shape))
                self.gate.weight.copy_(tensor)
                loaded.add(name)
            elif leaf == "e_score_correction_bias" and self.e_score_correction_bias is not None:
                _check_float_tensor(name, tensor, tuple(self.e_score_correction_bias.shape))
                self.e_score_correction_bias.copy_(tensor)
                loaded.add(name)
        return loaded

    @torch.no_grad()
    def finalize_weights(self) -> None:
        """Call once after loading (the first forward does it otherwise): merges per-tensor FP8 gate/up
        scales into one per expert, and lets the experts backend convert weights into its own layout (e.g.
        DeepGEMM's scale layout) at load time instead of on the first forward. Call it before
        ``torch.compile(..., fullgraph=True)``: the merge rewrites weights in place and runs eagerly."""
        if self._pending_requant:
            self._requantize_per_tensor_w13()
        prepare = getattr(self.kernel.experts, "prepare_weights", None)
        if prepare is not None:
            prepare(self.expert_weights())

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"experts={c.num_experts} (local {c.num_local_experts}), top_k={c.top_k}, hidden={c.hidden_size}, "
            f"intermediate={c.intermediate_size}, activation={c.activation}, quant={c.quant.name}, "
            f"kernel={self.kernel.describe()}"
        )


def _merge_pending_scales(module: "FusedMoE", prefix: str, keep_vars: bool) -> None:
    """State-dict pre-hook: per-tensor FP8 gate/up scales loaded but not yet merged (the merge waits for
    the first forward) are merged now, so the saved weights and scales are the ones the layer runs."""
    if module._pending_requant:
        with torch.no_grad():
            module._requantize_per_tensor_w13()


def _check_float_tensor(name: str, tensor: torch.Tensor, want: tuple[int, ...] | None = None) -> None:
    """A floating-point tensor (of shape ``want`` when given), else an error naming ``name``."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if want is not None and tuple(tensor.shape) != want:
        raise ValueError(f"{name} must have shape {want}, got {tuple(tensor.shape)}")
    # copy_ would silently convert an integer tensor (a wrong checkpoint entry) into weights or scales
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
