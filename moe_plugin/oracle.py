"""The oracle: which PrepareAndFinalize + PermuteExpertsUnpermute pair serves a config on a device.

One registry per half, in priority order; each backend answers ``supports(config, caps) -> (ok, reason)``
and the oracle picks the first pair that agrees on the activation format. ``explain`` lists every
candidate with "chosen" or its one rejection reason. ``MOE_PLUGIN_EXPERTS`` /
``MOE_PLUGIN_PREPARE_FINALIZE`` (or the ``experts=`` / ``prepare_finalize=`` arguments) force a backend;
a forced backend that cannot run raises ``BackendUnavailableError`` saying why.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import MoEConfig
from .modular import ModularKernel, PermuteExpertsUnpermute, PrepareAndFinalize

logger = logging.getLogger(__name__)

OPTIONAL_MODULES = ("triton", "deep_gemm", "deep_ep")


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run here, or no pair of backends can serve the config."""


@dataclass(frozen=True)
class Capabilities:
    """What the device and the environment offer."""

    device_type: str
    capability: tuple[int, int] | None
    device_name: str
    modules: dict[str, str] = field(default_factory=dict)
    """Optional module -> "" when importable, else why not."""

    def has(self, module: str) -> bool:
        return self.modules.get(module, "not probed") == ""

    def missing_reason(self, module: str) -> str:
        return self.modules.get(module, "not probed")

    @property
    def is_cuda(self) -> bool:
        return self.device_type == "cuda"

    def describe(self) -> str:
        cap = f"sm{self.capability[0]}{self.capability[1]}" if self.capability else "no CUDA capability"
        return f"{self.device_type} ({self.device_name}, {cap})"


def _module_status(name: str) -> str:
    try:
        importlib.import_module(name)
    except Exception as exc:  # any import failure (missing, ABI mismatch, NCCL check) means unusable
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    return ""


@functools.lru_cache(maxsize=None)
def _probe_modules() -> tuple[tuple[str, str], ...]:
    return tuple((name, _module_status(name)) for name in OPTIONAL_MODULES)


def probe(device: torch.device | str | None = None) -> Capabilities:
    """Capabilities of ``device`` (default: CUDA when available, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    modules = dict(_probe_modules())
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return Capabilities(
            "cuda", tuple(torch.cuda.get_device_capability(index)), torch.cuda.get_device_name(index), modules
        )
    return Capabilities(device.type, None, device.type, modules)


@dataclass(frozen=True)
class BackendEntry:
    """One registered backend: its name, where its class lives and its priority (higher wins)."""

    name: str
    target: str
    """``module:Class``, imported lazily so a backend whose optional module is missing stays listable."""
    priority: int

    def load(self) -> type:
        module, cls = self.target.split(":")
        return getattr(importlib.import_module(module), cls)


EXPERTS_REGISTRY: list[BackendEntry] = [
    BackendEntry("deep_gemm", "moe_plugin.experts.deep_gemm:DeepGemmExperts", 90),
    BackendEntry("batched_deep_gemm", "moe_plugin.experts.batched_deep_gemm:BatchedDeepGemmExperts", 85),
    BackendEntry("triton", "moe_plugin.experts.triton:TritonExperts", 50),
    BackendEntry("batched_triton", "moe_plugin.experts.batched_triton:BatchedTritonExperts", 45),
    BackendEntry("torch", "moe_plugin.experts.torch_ref:TorchExperts", 10),
    BackendEntry("batched_torch", "moe_plugin.experts.torch_ref:BatchedTorchExperts", 5),
]

PREPARE_FINALIZE_REGISTRY: list[BackendEntry] = [
    BackendEntry("deepep_ll", "moe_plugin.prepare_finalize.deepep_ll:DeepEPLLPrepareAndFinalize", 90),
    BackendEntry("deepep_ht", "moe_plugin.prepare_finalize.deepep_ht:DeepEPHTPrepareAndFinalize", 80),
    BackendEntry("all2all", "moe_plugin.prepare_finalize.all2all:AllToAllPrepareAndFinalize", 50),
    BackendEntry("batched_all2all", "moe_plugin.prepare_finalize.all2all:BatchedAllToAllPrepareAndFinalize", 45),
    BackendEntry("local", "moe_plugin.prepare_finalize.local:LocalPrepareAndFinalize", 30),
    BackendEntry("batched_local", "moe_plugin.prepare_finalize.local:BatchedLocalPrepareAndFinalize", 20),
]


@dataclass
class Verdict:
    name: str
    ok: bool
    reason: str
    cls: type | None = None


@dataclass
class Selection:
    """The oracle's answer: the chosen classes and every candidate's verdict."""

    prepare_finalize: type[PrepareAndFinalize]
    experts: type[PermuteExpertsUnpermute]
    prepare_finalize_verdicts: list[Verdict]
    experts_verdicts: list[Verdict]
    caps: Capabilities

    def summary(self) -> str:
        return f"prepare_finalize={self.prepare_finalize.name} experts={self.experts.name}"

    def explain(self) -> str:
        lines = [f"device: {self.caps.describe()}", "prepare/finalize candidates:"]
        lines += [f"  {v.name:<18} {v.reason}" for v in self.prepare_finalize_verdicts]
        lines.append("experts candidates:")
        lines += [f"  {v.name:<18} {v.reason}" for v in self.experts_verdicts]
        return "\n".join(lines)


def _assess(entry: BackendEntry, config: MoEConfig, caps: Capabilities) -> Verdict:
    try:
        cls = entry.load()
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("moe_plugin"):
            return Verdict(entry.name, False, "not built into this version")
        return Verdict(entry.name, False, f"cannot import: {exc}")
    except Exception as exc:
        return Verdict(entry.name, False, f"cannot import: {type(exc).__name__}: {exc}")
    for module in getattr(cls, "required_modules", ()):
        if not caps.has(module):
            return Verdict(entry.name, False, f"needs {module} ({caps.missing_reason(module)})", cls)
    ok, reason = cls.supports(config, caps)
    return Verdict(entry.name, ok, "" if ok else reason, cls)


def _forced(name_arg: str | None, env: str) -> str | None:
    return name_arg or os.environ.get(env) or None


def _registry_names(registry: list[BackendEntry]) -> list[str]:
    return [e.name for e in registry]


def select(
    config: MoEConfig,
    device: torch.device | str | None = None,
    *,
    experts: str | None = None,
    prepare_finalize: str | None = None,
    caps: Capabilities | None = None,
) -> Selection:
    """Choose the backend pair for ``config`` on ``device`` (see module docstring for overrides)."""
    caps = caps or probe(device)
    forced_pf = _forced(prepare_finalize, "MOE_PLUGIN_PREPARE_FINALIZE")
    forced_ex = _forced(experts, "MOE_PLUGIN_EXPERTS")
    for forced, registry, what in (
        (forced_pf, PREPARE_FINALIZE_REGISTRY, "prepare_finalize"),
        (forced_ex, EXPERTS_REGISTRY, "experts"),
    ):
        if forced is not None and forced not in _registry_names(registry):
            raise ValueError(f"unknown {what} backend {forced!r}; known: {_registry_names(registry)}")

    pf_entries = sorted(PREPARE_FINALIZE_REGISTRY, key=lambda e: -e.priority)
    ex_entries = sorted(EXPERTS_REGISTRY, key=lambda e: -e.priority)
    pf_verdicts = [_assess(e, config, caps) for e in pf_entries]
    ex_verdicts = [_assess(e, config, caps) for e in ex_entries]

    for forced, verdicts, what in ((forced_pf, pf_verdicts, "prepare_finalize"), (forced_ex, ex_verdicts, "experts")):
        if forced is not None:
            v = next(v for v in verdicts if v.name == forced)
            if not v.ok:
                raise BackendUnavailableError(f"forced {what} backend {forced!r} cannot run: {v.reason}")
            for other in verdicts:
                if other.name != forced and other.ok:
                    other.ok, other.reason = False, f"{what} forced to {forced!r}"

    chosen: tuple[Verdict, Verdict] | None = None
    # A usable backend passed over for want of a partner says so, whichever way the search ends.
    unpaired: dict[str, str] = {}
    for pf in pf_verdicts:
        if not pf.ok:
            continue
        for ex in ex_verdicts:
            if ex.ok and ex.cls.activation_format == pf.cls.activation_format:
                chosen = (pf, ex)
                break
        if chosen:
            break
        unpaired[pf.name] = f"no usable experts backend takes the {pf.cls.activation_format.value} format"
    if chosen is None:
        for verdicts in (pf_verdicts, ex_verdicts):
            for v in verdicts:
                if v.ok:
                    v.reason = unpaired.get(
                        v.name, f"no usable prepare_finalize backend produces the {v.cls.activation_format.value} format"
                    )
        sel = Selection(None, None, pf_verdicts, ex_verdicts, caps)  # type: ignore[arg-type]
        raise BackendUnavailableError("no backend pair can serve this config:\n" + sel.explain())
    pf_choice, ex_choice = chosen
    for v in pf_verdicts:
        if v is pf_choice:
            v.reason = "chosen"
        elif v.name in unpaired:
            v.reason = unpaired[v.name]
        elif v.ok:
            v.reason = f"lower priority than {pf_choice.name}"
    for v in ex_verdicts:
        if v is ex_choice:
            v.reason = "chosen"
        elif v.ok:
            if v.cls.activation_format != pf_choice.cls.activation_format:
                v.reason = f"{v.cls.activation_format.value} format does not match {pf_choice.name}"
            else:
                v.reason = f"lower priority than {ex_choice.name}"
    selection = Selection(pf_choice.cls, ex_choice.cls, pf_verdicts, ex_verdicts, caps)
    logger.debug("moe_plugin oracle for %s:\n%s", config, selection.explain())
    return selection


def explain(config: MoEConfig, device: torch.device | str | None = None, **kwargs: Any) -> str:
    """Every candidate backend with "chosen" or the reason it was rejected."""
    return select(config, device, **kwargs).explain()


def known_prepare_finalize_kwargs() -> frozenset[str]:
    """Every keyword some registered prepare/finalize backend's ``from_config`` names (``select_kernel``
    refuses others); read from the signatures, so a newly registered backend's options count too."""
    names: set[str] = set()
    for entry in PREPARE_FINALIZE_REGISTRY:
        params = list(inspect.signature(entry.load().from_config).parameters.values())[1:]  # after config
        names.update(p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))
    return frozenset(names)


def select_kernel(
    config: MoEConfig,
    device: torch.device | str | None = None,
    *,
    experts: str | None = None,
    prepare_finalize: str | None = None,
    shared_experts=None,
    **prepare_finalize_kwargs: Any,
) -> ModularKernel:
    """Build the ``ModularKernel`` the oracle chooses for ``config`` on ``device``.

    ``prepare_finalize_kwargs`` reach the prepare/finalize backend's ``from_config`` (e.g. ``group=`` for
    the EP backends).
    """
    known = known_prepare_finalize_kwargs()
    unknown = sorted(set(prepare_finalize_kwargs) - known)
    if unknown:
        # A misspelled option (or a FusedMoE keyword that does not exist) must not be dropped silently.
        raise TypeError(f"unknown keyword argument(s) {unknown}; the prepare/finalize backends take {sorted(known)}")
    selection = select(config, device, experts=experts, prepare_finalize=prepare_finalize)
    pf = selection.prepare_finalize.from_config(config, **prepare_finalize_kwargs)
    kernel = ModularKernel(pf, selection.experts(config), shared_experts=shared_experts)
    logger.info("moe_plugin: %s on %s", kernel.describe(), selection.caps.describe())
    return kernel
