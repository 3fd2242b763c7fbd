"""vLLM plugin: vLLM's unquantized and block-FP8 MoE layers run through moe_plugin's ``ModularKernel``.

vLLM loads this module through its ``vllm.general_plugins`` entry point (``moe_plugin =
moe_plugin.integrations.vllm:register``) in every process it starts. ``register`` puts
``MoePluginUnquantizedFusedMoEMethod`` in place of vLLM's ``UnquantizedFusedMoEMethod`` through vLLM's
out-of-tree mechanism (``CustomOp.register_oot``). Each MoE layer then builds, in ``_init_moe_kernel``
after its weights are loaded, the kernel that moe_plugin's oracle chooses for its shape, device and dtype,
and every forward pass calls it through the ``moe_plugin::vllm_experts`` custom op, which torch.compile
treats as opaque (vLLM compiles models unless ``enforce_eager``).

Turning it off: ``MOE_PLUGIN_VLLM=0`` (this plugin only), or vLLM's own allow-list ``VLLM_PLUGINS``
(a comma-separated list of the plugins to load; ``moe_plugin`` must be in it when it is set).

FP8 MoE layers: vLLM's ``Fp8MoEMethod`` is not a CustomOp, so ``register`` also registers the quantization
config ``moe_plugin_fp8`` (``register_quantization_config``), a ``Fp8Config`` that claims block-FP8
checkpoints (``quant_method: fp8`` with ``weight_block_size``) unless the user asked for
``quantization="fp8"`` explicitly. It keeps vLLM's methods for linear and attention layers and gives MoE
layers ``MoePluginFp8MoEMethod``.

A layer that moe_plugin cannot serve (biases, LoRA, EPLB, an activation it lacks, per-tensor FP8) keeps
vLLM's own kernel, and a warning says why. Expert parallelism: vLLM dispatches and combines tokens over its
EP group (its naive dispatch path, since these methods expose no vLLM modular kernel) and hands each rank's
layer its ``expert_map``; moe_plugin's kernel computes the local experts with that map.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from ..config import MoEConfig, QuantConfig, QuantScheme
from ..modular import ExpertWeights, ModularKernel

# A child of vLLM's "vllm" logger, so the lines show up in vLLM's log with its format and level.
logger = logging.getLogger("vllm.moe_plugin")

ENV_SWITCH = "MOE_PLUGIN_VLLM"
FP8_QUANTIZATION = "moe_plugin_fp8"
"""The vLLM quantization method name under which moe_plugin serves block-FP8 checkpoints."""

# vLLM MoEActivation value -> moe_plugin activation (same math and the same w13 layout).
ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "relu2_no_mul": "relu2"}

_KERNELS: dict[str, ModularKernel] = {}
_CALLS = {"vllm_experts": 0}
_LOGGED: set[str] = set()


def call_count() -> int:
    """How many times the ``moe_plugin::vllm_experts`` op body has run in this process."""
    return _CALLS["vllm_experts"]


def layer_names() -> list[str]:
    """The vLLM MoE layers (by vLLM's layer name) that have a moe_plugin kernel in this process."""
    return sorted(_KERNELS)


def kernel_for_layer(layer_name: str) -> ModularKernel:
    """The kernel built for the vLLM MoE layer ``layer_name`` (after its weights were loaded)."""
    try:
        return _KERNELS[layer_name]
    except KeyError:
        raise KeyError(
            f"no moe_plugin kernel for vLLM layer {layer_name!r}: its weights were not processed yet "
            f"(known layers: {sorted(_KERNELS)[:8]})"
        ) from None


def enabled_by_env() -> bool:
    """False when ``MOE_PLUGIN_VLLM`` turns the plugin off ("0", "false", "off", "no")."""
    value = os.environ.get(ENV_SWITCH, "1").strip().lower()
    if value in ("0", "false", "off", "no"):
        return False
    if value in ("1", "true", "on", "yes", ""):
        return True
    raise ValueError(f"{ENV_SWITCH} must be 1 or 0 (also true/false, on/off, yes/no), got {value!r}")


@torch.library.custom_op("moe_plugin::vllm_experts", mutates_args=())
def _vllm_experts_op(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: torch.Tensor | None,
    w13_scale: torch.Tensor | None,
    w2_scale: torch.Tensor | None,
    layer_name: str,
    activation: str,
    global_num_experts: int,
    apply_router_weight_on_input: bool,
) -> torch.Tensor:
    _CALLS["vllm_experts"] += 1
    kernel = kernel_for_layer(layer_name)
    return kernel(
        x,
        ExpertWeights(w13, w2, w13_scale, w2_scale),
        topk_weights,
        topk_ids,
        activation=activation,
        global_num_experts=global_num_experts,
        expert_map=expert_map,
        apply_router_weight_on_input=apply_router_weight_on_input,
    )


@_vllm_experts_op.register_fake
def _(x, *args) -> torch.Tensor:
    return torch.empty_like(x)


def vllm_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    layer_name: str,
    activation: str = "silu",
    global_num_experts: int | None = None,
    expert_map: torch.Tensor | None = None,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    apply_router_weight_on_input: bool = False,
) -> torch.Tensor:
    """Run the experts of vLLM layer ``layer_name`` (kernel from ``build_layer_kernel``) on ``x [M, K]``.

    ``w13 [E_local, 2N, K]`` (gate rows then up rows), ``w2 [E_local, K, N]``, with their block scales
    (``[E_local, ceil(rows/bn), ceil(cols/bk)]`` fp32) when the kernel is FP8; returns ``[M, K]``.
    """
    if global_num_experts is None:
        global_num_experts = expert_map.shape[0] if expert_map is not None else w13.shape[0]
    return torch.ops.moe_plugin.vllm_experts(
        x, w13, w2, topk_weights, topk_ids, expert_map, w13_scale, w2_scale, layer_name, activation,
        global_num_experts, apply_router_weight_on_input,
    )


def build_layer_kernel(
    layer_name: str,
    *,
    num_experts: int,
    top_k: int,
    w13: torch.Tensor,
    w2: torch.Tensor,
    activation: str,
    dtype: torch.dtype | None = None,
    quant: QuantConfig | None = None,
) -> ModularKernel:
    """Build (with the oracle) and remember the kernel for one vLLM MoE layer; ``num_experts`` is the global
    count, ``dtype`` the activations' (default: the weights'; required for FP8 weights). Logs one line per
    distinct backend pair, naming it."""
    from ..oracle import select_kernel

    if activation not in ACTIVATIONS.values():
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS.values())}, got {activation!r}")
    quant = QuantConfig() if quant is None else quant
    if dtype is None:
        if quant.is_quantized:
            raise ValueError(f"dtype (the activations' dtype) is required with {quant.name} weights")
        dtype = w13.dtype
    config = MoEConfig(
        num_experts=num_experts,
        top_k=top_k,
        hidden_size=w13.shape[2],
        intermediate_size=w2.shape[2],
        dtype=dtype,
        activation=activation,
        quant=quant,
    )
    # vLLM's expert parallelism places w13.shape[0] experts here: the batched layouts are sized by them
    extra = {} if w13.shape[0] == config.num_local_experts else {"num_local_experts": w13.shape[0]}
    kernel = select_kernel(config, w13.device, **extra)
    _KERNELS[layer_name] = kernel
    description = f"{kernel.describe()} on {w13.device.type}"
    if description not in _LOGGED:
        _LOGGED.add(description)
        logger.info("moe_plugin runs vLLM MoE layers: %s (first layer: %s)", description, layer_name)
    logger.debug("moe_plugin kernel for %s: %s", layer_name, description)
    return kernel


def unsupported_reason(moe) -> str | None:
    """Why moe_plugin cannot serve a vLLM layer with ``FusedMoEConfig`` ``moe`` (None when it can)."""
    activation = getattr(moe.activation, "value", moe.activation)
    if activation not in ACTIVATIONS:
        return f"activation {activation!r} (moe_plugin serves {sorted(ACTIVATIONS)})"
    if moe.has_bias:
        return "expert biases"
    if moe.is_lora_enabled:
        return "MoE LoRA"
    if moe.moe_parallel_config.enable_eplb:
        return "EPLB (redundant experts)"
    if moe.in_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"activation dtype {moe.in_dtype}"
    return None


def _warn_skip_once(reason: str) -> None:
    if reason not in _LOGGED:
        _LOGGED.add(reason)
        logger.warning("moe_plugin does not serve MoE layers with %s; vLLM's own kernel runs them", reason)


class _MoePluginMethod:
    """What moe_plugin's vLLM MoE methods share; mixed in before the vLLM method class they replace, which
    serves the layers moe_plugin cannot (``moe_plugin_skip_reason`` set)."""

    moe_plugin_skip_reason: str | None = None
    moe_plugin_kernel: ModularKernel | None = None

    @property
    def uses_moe_plugin(self) -> bool:
        return self.moe_plugin_skip_reason is None

    @property
    def is_monolithic(self) -> bool:
        # moe_plugin takes routed top-k ids. vLLM's answer would come from the experts class its own oracle
        # chose (monolithic ones take router logits; the FP8 oracle may have chosen none at all).
        return False if self.uses_moe_plugin else super().is_monolithic

    def _moe_plugin_scales(self, layer) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return None, None

    def _moe_plugin_quant(self) -> QuantConfig:
        return QuantConfig()

    def _moe_plugin_build(self, layer) -> None:
        for name in ("w13_weight", "w2_weight"):
            param = getattr(layer, name)
            if not param.is_contiguous():
                param.data = param.data.contiguous()
        activation = ACTIVATIONS[getattr(layer.activation, "value", layer.activation)]
        self.moe_plugin_activation = activation
        self.moe_plugin_layer_name = layer.layer_name
        self.moe_plugin_kernel = build_layer_kernel(
            layer.layer_name,
            num_experts=layer.global_num_experts,
            top_k=layer.top_k,
            w13=layer.w13_weight,
            w2=layer.w2_weight,
            activation=activation,
            dtype=layer.moe_config.in_dtype,
            quant=self._moe_plugin_quant(),
        )

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
        if not self.uses_moe_plugin:
            return super().apply(layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input)
        w13_scale, w2_scale = self._moe_plugin_scales(layer)
        return vllm_experts(
            x,
            layer.w13_weight,
            layer.w2_weight,
            topk_weights,
            topk_ids,
            layer_name=self.moe_plugin_layer_name,
            activation=self.moe_plugin_activation,
            global_num_experts=layer.global_num_experts,
            expert_map=layer.expert_map,
            w13_scale=w13_scale,
            w2_scale=w2_scale,
            apply_router_weight_on_input=layer.apply_router_weight_on_input,
        )


@functools.lru_cache(maxsize=1)
def method_class() -> type:
    """``MoePluginUnquantizedFusedMoEMethod``, built on first use so that importing this module does not
    import vLLM's MoE stack before vLLM has set itself up."""
    from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

    class MoePluginUnquantizedFusedMoEMethod(_MoePluginMethod, UnquantizedFusedMoEMethod):
        """vLLM's unquantized MoE method with moe_plugin's kernel; vLLM's own for layers it cannot serve.

        Weights stay in vLLM's standard layout (``w13_weight [E_local, 2N, K]``, ``w2_weight [E_local, K,
        N]``), which is moe_plugin's. ``moe_kernel`` (vLLM's modular kernel) stays None, so vLLM's runner
        runs shared experts and any EP dispatch/combine itself.
        """

        def __init__(self, moe):
            super().__init__(moe)
            self.moe_plugin_skip_reason = unsupported_reason(moe)
            if self.moe_plugin_skip_reason is not None:
                _warn_skip_once(self.moe_plugin_skip_reason)

        def maybe_roundup_sizes(self, hidden_size, intermediate_size_per_partition, act_dtype, moe_parallel_config):
            if not self.uses_moe_plugin:
                return super().maybe_roundup_sizes(
                    hidden_size, intermediate_size_per_partition, act_dtype, moe_parallel_config
                )
            # Only the generic rounding; vLLM's per-backend padding serves vLLM's kernels.
            return FusedMoEMethodBase.maybe_roundup_sizes(
                self, hidden_size, intermediate_size_per_partition, act_dtype, moe_parallel_config
            )

        def process_weights_after_loading(self, layer) -> None:
            if not self.uses_moe_plugin:
                super().process_weights_after_loading(layer)
                return
            # No repacking: moe_plugin reads vLLM's checkpoint layout as it is.
            self._init_moe_kernel(layer)

        def _init_moe_kernel(self, layer) -> None:
            if not self.uses_moe_plugin:
                super()._init_moe_kernel(layer)
                return
            self.moe_quant_config = self.get_fused_moe_quant_config(layer)
            self._moe_plugin_build(layer)

    return MoePluginUnquantizedFusedMoEMethod


def fp8_unsupported_reason(method) -> str | None:
    """Why moe_plugin cannot serve the FP8 layer of vLLM's ``Fp8MoEMethod`` ``method`` (None when it can)."""
    reason = unsupported_reason(method.moe)
    if reason is not None:
        return reason
    if not method.block_quant:
        return "per-tensor FP8 weights"
    if method.weight_scale_refine is not None:
        return "FP8 block scales refined for tensor parallelism"
    return None


@functools.lru_cache(maxsize=1)
def fp8_method_class() -> type:
    """``MoePluginFp8MoEMethod``: vLLM's FP8 MoE method with moe_plugin's block-FP8 kernel."""
    from vllm.model_executor.layers.quantization.fp8 import Fp8MoEMethod

    class MoePluginFp8MoEMethod(_MoePluginMethod, Fp8MoEMethod):
        """Block-FP8 experts (``float8_e4m3fn`` weights, ``weight_scale_inv`` block scales, dynamic
        per-token-group activation quantization) through moe_plugin; vLLM's ``Fp8MoEMethod`` otherwise.

        vLLM's weight creation and loading are kept; its backend conversion is skipped, since the
        checkpoint layout (``w13_weight [E, 2N, K]``, scales ``[E, 2N/bn, K/bk]``) is moe_plugin's.
        """

        def __init__(self, quant_config, layer):
            super().__init__(quant_config, layer)
            self.moe_plugin_skip_reason = fp8_unsupported_reason(self)
            if self.moe_plugin_skip_reason is not None:
                _warn_skip_once(self.moe_plugin_skip_reason)

        def _moe_plugin_quant(self) -> QuantConfig:
            return QuantConfig(QuantScheme.FP8_W8A8, tuple(self.weight_block_size))

        def _moe_plugin_scales(self, layer):
            return getattr(layer, f"w13_{self.weight_scale_name}"), getattr(layer, f"w2_{self.weight_scale_name}")

        def process_weights_after_loading(self, layer) -> None:
            if not self.uses_moe_plugin:
                super().process_weights_after_loading(layer)
                return
            self._init_moe_kernel(layer)

        def _init_moe_kernel(self, layer) -> None:
            if not self.uses_moe_plugin:
                super()._init_moe_kernel(layer)
                return
            self._moe_plugin_build(layer)

        def get_fused_moe_quant_config(self, layer):
            if not self.uses_moe_plugin:
                return super().get_fused_moe_quant_config(layer)
            # vLLM's runner asks for it; moe_plugin's kernel carries its own quant config.
            from vllm.model_executor.layers.fused_moe.config import fp8_w8a8_moe_quant_config

            w13_scale, w2_scale = self._moe_plugin_scales(layer)
            return fp8_w8a8_moe_quant_config(
                w1_scale=w13_scale, w2_scale=w2_scale, a1_scale=None, block_shape=list(self.weight_block_size)
            )

    return MoePluginFp8MoEMethod


def claims_checkpoint(hf_quant_cfg: dict, user_quant: str | None) -> bool:
    """Whether ``moe_plugin_fp8`` serves a checkpoint with quantization config ``hf_quant_cfg``: serialized
    block FP8, and the user did not name another method (``quantization="fp8"`` keeps vLLM's)."""
    return (
        hf_quant_cfg.get("quant_method") == "fp8"
        and bool(hf_quant_cfg.get("weight_block_size"))
        and hf_quant_cfg.get("activation_scheme", "dynamic") == "dynamic"
        and user_quant in (None, FP8_QUANTIZATION)
    )


@functools.lru_cache(maxsize=1)
def fp8_config_class() -> type:
    """``MoePluginFp8Config``: vLLM's ``Fp8Config`` whose MoE layers use ``MoePluginFp8MoEMethod``."""
    from vllm.model_executor.layers.quantization.fp8 import Fp8Config, Fp8MoEMethod

    class MoePluginFp8Config(Fp8Config):
        @classmethod
        def get_name(cls) -> str:
            return FP8_QUANTIZATION

        @classmethod
        def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None):
            return FP8_QUANTIZATION if claims_checkpoint(hf_quant_cfg, user_quant) else None

        def get_quant_method(self, layer, prefix):
            method = super().get_quant_method(layer, prefix)
            if type(method) is Fp8MoEMethod:
                return fp8_method_class()(self, layer)
            return method

    return MoePluginFp8Config


def register() -> bool:
    """vLLM's ``vllm.general_plugins`` entry point. Returns whether moe_plugin is now registered.

    Safe to call more than once (vLLM calls it in each of its processes)."""
    if not enabled_by_env():
        logger.info("moe_plugin vLLM plugin is off (%s=0): vLLM's own MoE kernels run", ENV_SWITCH)
        return False
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config

    cls = method_class()
    current = op_registry_oot.get(UnquantizedFusedMoEMethod.__name__)
    if current is None:
        UnquantizedFusedMoEMethod.register_oot(cls)
    elif current is not cls:
        raise RuntimeError(
            f"another plugin already replaced vLLM's UnquantizedFusedMoEMethod with {current.__module__}."
            f"{current.__qualname__}; load only one of them (VLLM_PLUGINS lists the plugins to load)"
        )
    if FP8_QUANTIZATION not in QUANTIZATION_METHODS:
        register_quantization_config(FP8_QUANTIZATION)(fp8_config_class())
    logger.info("moe_plugin vLLM plugin registered: unquantized and block-FP8 MoE layers use moe_plugin kernels")
    return True
