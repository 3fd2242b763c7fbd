"""Launch configs of the Triton experts: tile shapes per GEMM, how they are parsed from and written to
the tuned JSON files, where those files are looked up, and the shape heuristic used without one.

Files live in ``configs/`` (``E=..,N=..,device_name=..,dtype=...json`` mapping M to a config; see
``config_file_name`` and ``configs/README.md``), searched after ``$MOE_PLUGIN_TRITON_CONFIG_DIR``;
``$MOE_PLUGIN_TRITON_CONFIG`` (one JSON config) forces a config for every call.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..config import QuantConfig
from .align import _cdiv, _next_pow2

try:
    import triton
except ImportError:  # torch-only installs
    triton = None

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).with_name("configs")
CONFIG_DIR_ENV = "MOE_PLUGIN_TRITON_CONFIG_DIR"
FORCE_CONFIG_ENV = "MOE_PLUGIN_TRITON_CONFIG"

TMA_MODES = ("off", "weights", "all")

SLOT_ROUTING_MAX_SLOTS = 256
"""Largest ``M * top_k`` the slot routing accepts (its prologue compares every slot id in registers)."""


@dataclass(frozen=True)
class GemmLaunch:
    """Tile shape and launch parameters of one GEMM.

    For the gated GEMM1 ``block_n`` counts output columns of the activation: each program computes
    ``block_n`` gate rows and the matching ``block_n`` up rows of ``w1``.
    """

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 1
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 16 or v & (v - 1):
                raise ValueError(f"GemmLaunch.{name} must be a power of two >= 16, got {v!r}")
        for name in ("group_m", "num_warps", "num_stages", "split_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"GemmLaunch.{name} must be a positive int, got {v!r}")
        if self.num_warps & (self.num_warps - 1):
            raise ValueError(f"GemmLaunch.num_warps must be a power of two, got {self.num_warps}")


@dataclass(frozen=True)
class LaunchConfig:
    """Both GEMMs of one experts call. They share ``block_m`` because they share one token sort."""

    gemm1: GemmLaunch
    gemm2: GemmLaunch
    routing: str = "auto"
    """``"slot"`` (no sort; decode sizes), ``"sorted"`` (align + grouped GEMM) or ``"auto"``."""
    persistent: bool = False
    """Launch about two programs per SM that stride over the tiles instead of one program per tile
    (with ``tma``: one per SM)."""
    tma: str = "off"
    """Sorted routing with TMA-fed tiles (``ops.tma_gemm``; bf16 / fp16, Hopper+): ``"weights"`` loads the
    weights and GEMM2's input through descriptors while GEMM1 gathers its token rows with pointers;
    ``"all"`` first scatters the tokens into sorted order so GEMM1 reads them through a descriptor too.
    Standard format only: the batched format runs these tiles on the pointer kernel."""
    source: str = field(default="heuristic", compare=False)

    def __post_init__(self) -> None:
        if self.gemm1.block_m != self.gemm2.block_m:
            raise ValueError(
                f"gemm1 and gemm2 must share block_m (one token sort), got {self.gemm1.block_m} and {self.gemm2.block_m}"
            )
        if self.routing not in ("auto", "slot", "sorted"):
            raise ValueError(f"routing must be 'auto', 'slot' or 'sorted', got {self.routing!r}")
        if self.gemm1.split_k != 1:
            raise ValueError("split_k is only supported for GEMM2 (GEMM1's epilogue needs complete sums)")
        if self.tma not in TMA_MODES:
            raise ValueError(f"tma must be one of {TMA_MODES}, got {self.tma!r}")
        if self.tma != "off" and (self.routing == "slot" or self.gemm2.split_k != 1):
            raise ValueError("tma needs sorted routing and no split-K")

    @staticmethod
    def from_dict(d: dict[str, Any], source: str = "dict") -> "LaunchConfig":
        """Parse a vLLM-style entry (``BLOCK_SIZE_M`` ...) with optional ``routing``, ``persistent`` and a
        ``gemm2`` dict overriding GEMM2's keys."""
        if not isinstance(d, dict):
            raise TypeError(f"a launch config must be a dict, got {type(d).__name__}")
        known = {"BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages",
                 "SPLIT_K", "routing", "persistent", "tma", "gemm2"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown launch config keys {sorted(unknown)}; known: {sorted(known)}")

        def integer(src: dict[str, Any], key: str, default: int | None = None) -> int:
            if key not in src:
                if default is None:
                    raise ValueError(f"launch config needs {key}")
                return default
            value = src[key]
            # bool is an int in Python, and 16.7 must not become 16 silently
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"launch config {key} must be an int, got {value!r}")
            return value

        def gemm(src: dict[str, Any], base: dict[str, Any]) -> GemmLaunch:
            merged = {**base, **src}
            return GemmLaunch(
                block_m=integer(merged, "BLOCK_SIZE_M"),
                block_n=integer(merged, "BLOCK_SIZE_N"),
                block_k=integer(merged, "BLOCK_SIZE_K"),
                group_m=integer(merged, "GROUP_SIZE_M", 1),
                num_warps=integer(merged, "num_warps", 4),
                num_stages=integer(merged, "num_stages", 3),
                split_k=integer(merged, "SPLIT_K", 1),
            )

        g2_raw = d.get("gemm2", {})
        if not isinstance(g2_raw, dict):
            raise ValueError(f"launch config gemm2 must be a dict of GEMM2's keys, got {g2_raw!r}")
        g2_known = {"BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages", "SPLIT_K"}
        if set(g2_raw) - g2_known:
            raise ValueError(f"unknown gemm2 keys {sorted(set(g2_raw) - g2_known)}; known: {sorted(g2_known)}")
        persistent = d.get("persistent", False)
        if not isinstance(persistent, bool):
            raise ValueError(f"launch config persistent must be true or false, got {persistent!r}")
        tma = d.get("tma", "off")
        if tma is False:
            tma = "off"
        if tma not in TMA_MODES:
            raise ValueError(f"launch config tma must be one of {TMA_MODES}, got {tma!r}")
        base = {k: v for k, v in d.items() if k not in ("gemm2", "routing", "persistent", "tma", "SPLIT_K")}
        g2 = dict(g2_raw)
        if "SPLIT_K" in d:
            g2.setdefault("SPLIT_K", d["SPLIT_K"])
        if "BLOCK_SIZE_M" in g2 and g2["BLOCK_SIZE_M"] != d["BLOCK_SIZE_M"]:
            raise ValueError("gemm2.BLOCK_SIZE_M must equal BLOCK_SIZE_M (both GEMMs share one token sort)")
        return LaunchConfig(
            gemm1=gemm({}, base),
            gemm2=gemm(g2, base),
            routing=str(d.get("routing", "auto")),
            persistent=persistent,
            tma=tma,
            source=source,
        )

    def to_dict(self) -> dict[str, Any]:
        g1, g2 = self.gemm1, self.gemm2
        out: dict[str, Any] = {
            "BLOCK_SIZE_M": g1.block_m,
            "BLOCK_SIZE_N": g1.block_n,
            "BLOCK_SIZE_K": g1.block_k,
            "GROUP_SIZE_M": g1.group_m,
            "num_warps": g1.num_warps,
            "num_stages": g1.num_stages,
            "routing": self.routing,
            "persistent": self.persistent,
            "tma": self.tma,
            "gemm2": {
                "BLOCK_SIZE_N": g2.block_n,
                "BLOCK_SIZE_K": g2.block_k,
                "GROUP_SIZE_M": g2.group_m,
                "num_warps": g2.num_warps,
                "num_stages": g2.num_stages,
                "SPLIT_K": g2.split_k,
            },
        }
        return out


def block_shape_problem(quant: QuantConfig) -> str | None:
    """Why the Triton kernels cannot take ``quant``'s block shape (their K tiles stay within one scale
    group, and tiles are powers of two), or None."""
    if quant.block_shape is None:
        return None
    bk = quant.block_shape[1]
    if bk < 16 or bk & (bk - 1):
        return f"block_shape {quant.block_shape}: the Triton kernels need a K block that is a power of two >= 16"
    return None


def dtype_tag(dtype: torch.dtype, quant: QuantConfig) -> str:
    """The ``dtype=`` part of a config file name."""
    if quant.is_quantized:
        return "fp8_w8a8"
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def config_file_name(
    num_experts: int, n: int, device_name: str, dtype: str, block_shape=None, *, batched: bool = False
) -> str:
    """``E=128,N=768,device_name=NVIDIA_H100_80GB_HBM3,dtype=bf16.json`` (``,block_shape=[128,128]`` for
    FP8 block scales, ``,layout=batched`` for the masked layout whose keys are rows per expert). ``E`` is
    the local expert count and ``N`` the intermediate size (w2's last dim)."""
    name = f"E={num_experts},N={n},device_name={device_name.replace(' ', '_')},dtype={dtype}"
    if block_shape is not None:
        name += f",block_shape=[{block_shape[0]},{block_shape[1]}]"
    if batched:
        name += ",layout=batched"
    return name + ".json"


@functools.lru_cache(maxsize=64)
def _load_config_file(path: str, mtime: float) -> dict[int, LaunchConfig]:
    """Every entry of a config file, parsed and checked at once: an error names the file and the entry."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"launch config file {path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object mapping M to a launch config")
    table = {}
    for key, value in raw.items():
        if key.startswith("_"):
            continue  # metadata (tuning provenance)
        try:
            m = int(key)
        except ValueError:
            raise ValueError(f"{path}: key {key!r} is not a token count (M)") from None
        try:
            table[m] = LaunchConfig.from_dict(value, source=f"{Path(path).name}[{m}]")
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}[{key}]: {exc}") from exc
    return table


def _config_dirs() -> list[Path]:
    dirs = []
    extra = os.environ.get(CONFIG_DIR_ENV)
    if extra:
        dirs.extend(Path(p) for p in extra.split(os.pathsep) if p)
    dirs.append(CONFIG_DIR)
    return dirs


LOOKUP_MAX_RATIO = 2.0
"""A file entry tuned for M' serves M only when max(M, M') / min(M, M') is at most this; a partially tuned
file must not hand a prefill config to a decode batch (the heuristic serves the gaps)."""


def lookup_config_file(file_name: str, m: int) -> LaunchConfig | None:
    """The entry of the first config file named ``file_name`` whose M key is nearest to ``m`` (in ratio),
    or None when no key is within ``LOOKUP_MAX_RATIO`` of ``m``."""
    m = max(1, m)
    for d in _config_dirs():
        path = d / file_name
        if not path.is_file():
            continue
        table = _load_config_file(str(path), path.stat().st_mtime)
        keys = [k for k in table if k > 0]
        if not keys:
            continue
        key = min(keys, key=lambda k: (abs(math.log2(k / m)), k))
        if max(key, m) / min(key, m) > LOOKUP_MAX_RATIO:
            return None
        return table[key]
    return None


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    num_sms: int
    smem_bytes: int
    capability: tuple[int, int] | None


@functools.lru_cache(maxsize=16)
def device_info(device: str) -> DeviceInfo:
    dev = torch.device(device)
    if dev.type != "cuda":
        # Interpreter runs: numbers only shape the heuristic; any positive values work.
        return DeviceInfo(name="cpu", num_sms=8, smem_bytes=228 * 1024, capability=None)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 0
    if not smem and triton is not None:
        try:
            smem = int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])
        except Exception:  # the property is only a budget; fall back to a value every sm80+ part has
            smem = 99 * 1024
    return DeviceInfo(
        name=torch.cuda.get_device_name(index),
        num_sms=props.multi_processor_count,
        smem_bytes=int(smem or 99 * 1024),
        capability=tuple(torch.cuda.get_device_capability(index)),
    )


def expected_active_experts(m: int, top_k: int, num_local: int, num_global: int) -> float:
    """Expected number of local experts that receive at least one of ``m`` tokens under uniform routing."""
    if m <= 0:
        return 0.0
    p_pick = min(1.0, top_k / num_global)
    return num_local * (1.0 - (1.0 - p_pick) ** m)


def _pick_block_n(blocks: float, n_out: int, target: int, candidates=(128, 64, 32, 16)) -> int:
    """Largest tile width that still gives ``target`` tiles (memory-bound sizes want every SM streaming)."""
    cap = max(16, _next_pow2(n_out))
    for bn in candidates:
        if bn <= cap and blocks * _cdiv(n_out, bn) >= target:
            return bn
    return min(candidates[-1], cap) if candidates[-1] <= cap else 16


def heuristic_config(
    m: int,
    num_local: int,
    num_global: int,
    n: int,
    k: int,
    top_k: int,
    *,
    fp8: bool,
    num_sms: int,
    group_k: int | None = None,
    tma: bool = False,
) -> LaunchConfig:
    """A launch config for ``m`` tokens routed top-``top_k`` over ``num_global`` experts, ``num_local``
    of them here, assuming uniform routing (see ``heuristic_for_rows``)."""
    slots = m * top_k
    local_slots = slots * num_local / num_global
    active = max(1.0, expected_active_experts(m, top_k, num_local, num_global))
    return heuristic_for_rows(
        local_slots / active, active, n, k, fp8=fp8, num_sms=num_sms, group_k=group_k, slots=slots, tma=tma
    )


def heuristic_for_rows(
    rows_per_expert: float,
    active_experts: float,
    n: int,
    k: int,
    *,
    fp8: bool,
    num_sms: int,
    group_k: int | None = None,
    slots: int | None = None,
    tma: bool = False,
) -> LaunchConfig:
    """A launch config from the rows each active expert gets.

    Few rows are memory-bound: small ``BLOCK_M`` (padding waste is the tax), tile widths chosen so about
    two tiles per SM stream weights, deep pipelines. Many rows are compute-bound: 128-row tiles with 256
    output columns per program (gated GEMM1: 128 gate + 128 up columns), 8 warps, grouped raster so the
    gathered rows stay in L2 while the program sweeps the columns; where ``tma`` says the device and
    dtype allow it, those tiles are fed by TMA (``tma="weights"``: measured on the H100 at 128+ rows per
    expert as 0-14 % faster than the pointer loads, never slower).
    """
    target = 2 * num_sms
    routing = "slot" if slots is not None and slots <= 64 else "sorted"
    if rows_per_expert <= 16:
        bm = 16
    elif rows_per_expert <= 48 and not (fp8 and group_k is not None):
        bm = 32
    elif rows_per_expert <= 160 or fp8:
        # FP8 block scales need a second accumulator per K step: 128-row gated tiles spill registers.
        # Block FP8 skips 32-row tiles: on model-dtype input those quantize their rows on load, once per
        # column tile, which at 32 rows per expert already costs more than one separate quantization pass
        # (H100, DeepSeek shard M=1024: 1066 us at 32 rows vs 580 at 64). Measured with bf16 input only;
        # per-tensor / per-channel FP8 (never quantized on load) keep the 32-row tiles.
        bm = 64
    else:
        bm = 128
    blocks = max(1.0, active_experts) * max(1, _cdiv(int(math.ceil(rows_per_expert)), bm))
    # Register and shared-memory budgets below were read off sm90 compiles (ptxas resource usage):
    # every default is spill-free and fits 227 KB.
    if bm <= 32:
        g1 = GemmLaunch(bm, _pick_block_n(blocks, n, target, (64, 32, 16)), 128, 1, 4, 4)
        g2 = GemmLaunch(bm, _pick_block_n(blocks, k, target, (128, 64, 32, 16)), 128, 1, 4, 4)
    elif fp8:
        g1 = GemmLaunch(64, 128, 128, 8, 8, 3)
        g2 = GemmLaunch(64, 256, 128, 8, 8, 3) if rows_per_expert > 160 else GemmLaunch(64, 128, 128, 8, 4, 4)
    elif bm == 64:
        g1 = GemmLaunch(64, 64, 64, 8, 4, 4)
        g2 = GemmLaunch(64, 128, 64, 8, 4, 4)
    else:
        g1 = GemmLaunch(128, 128, 64, 8, 8, 4)
        g2 = GemmLaunch(128, 256, 64, 8, 8, 4)
    if group_k is not None:
        g1 = replace(g1, block_k=min(g1.block_k, _prev_pow2(group_k)))
        g2 = replace(g2, block_k=min(g2.block_k, _prev_pow2(group_k)))
    use_tma = tma and bm == 128 and not fp8 and routing == "sorted"
    return LaunchConfig(
        g1, g2, routing=routing, persistent=False, tma="weights" if use_tma else "off", source="heuristic"
    )


EXPERT_GROUP_MIN_WEIGHT_BYTES = 8 << 20
"""One expert's weight for a GEMM from which sorted tiles are grouped by expert (``expert_grouped_raster``)."""

EXPERT_GROUP_MAX_BF16_BLOCKS = 2
"""Expected row blocks per expert up to which unquantized weights take expert-bounded groups."""


def expert_grouped_raster(weight: torch.Tensor, rows_per_expert: float, block_m: int, group_m: int) -> bool:
    """Whether a sorted grouped GEMM over ``weight [E, R, K]`` orders its tiles in groups that never
    straddle two experts (``_gemm_tiles.expert_tile_coords``).

    Fixed groups of ``group_m`` row blocks split some experts' blocks between groups that run in different
    waves, and those experts' weights are read from HBM twice; expert-bounded groups cost two dependent
    index loads per tile (and are the fixed order itself when ``group_m`` is 1). Measured on the H100
    (docs/benchmarks.md, same-process A/B): worth it for weights too large for L2 to hold across the split
    (>= 8 MiB per expert; qwen3-sized experts gain nothing) — FP8 at every size measured (0 to -6 %), bf16
    up to two row blocks per expert (-4 to -7 %; from four blocks on, where the GEMMs are compute-bound,
    +1 to +6 %)."""
    if group_m <= 1 or math.prod(weight.shape[1:]) * weight.element_size() < EXPERT_GROUP_MIN_WEIGHT_BYTES:
        return False
    return weight.element_size() == 1 or rows_per_expert <= EXPERT_GROUP_MAX_BF16_BLOCKS * block_m


def _prev_pow2(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def _smem_estimate(g: GemmLaunch, a_bytes: int, b_bytes: int, gated: bool, stages: int) -> int:
    # sm90 compiles allocate one A + B tile per stage (wgmma) or per stage but one (mma.sync); the
    # epilogue reuses the pipeline's buffers.
    per_stage = g.block_m * g.block_k * a_bytes + (2 if gated else 1) * g.block_k * g.block_n * b_bytes
    return stages * per_stage


def fit_stages(g: GemmLaunch, a_bytes: int, b_bytes: int, gated: bool, smem_limit: int) -> GemmLaunch:
    """Fewer pipeline stages when the requested ones cannot fit in shared memory."""
    stages = g.num_stages
    while stages > 1 and _smem_estimate(g, a_bytes, b_bytes, gated, stages) > smem_limit:
        stages -= 1
    return g if stages == g.num_stages else replace(g, num_stages=stages)


def get_launch_config(
    m: int,
    *,
    num_local: int,
    num_global: int,
    n: int,
    k: int,
    top_k: int,
    dtype: torch.dtype,
    quant: QuantConfig,
    device: torch.device | str,
    batched: bool = False,
) -> LaunchConfig:
    """The launch config for ``m`` tokens: forced by ``$MOE_PLUGIN_TRITON_CONFIG``, else the nearest M of a
    tuned file for this device and shape, else ``heuristic_config``.

    ``batched``: ``m`` is the rows per expert of the ``[E, T, K]`` layout, looked up in the files tagged
    ``,layout=batched``.
    """
    forced = os.environ.get(FORCE_CONFIG_ENV)
    if forced:
        try:
            return LaunchConfig.from_dict(json.loads(forced), source=FORCE_CONFIG_ENV)
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{FORCE_CONFIG_ENV} must hold one launch config as JSON: {exc}") from None
    info = device_info(str(torch.device(device)))
    name = config_file_name(num_local, n, info.name, dtype_tag(dtype, quant), quant.block_shape, batched=batched)
    cfg = lookup_config_file(name, m)
    group_k = quant.block_shape[1] if quant.block_shape is not None else None
    from .tma_gemm import tma_possible

    tma = not quant.is_quantized and tma_possible(dtype, device) and info.capability is not None
    if cfg is None and batched:
        cfg = heuristic_for_rows(float(m), num_local, n, k, fp8=quant.is_quantized, num_sms=info.num_sms, group_k=group_k)
    elif cfg is None:
        cfg = heuristic_config(
            m,
            num_local,
            num_global,
            n,
            k,
            top_k,
            fp8=quant.is_quantized,
            num_sms=info.num_sms,
            group_k=group_k,
            tma=tma,
        )
    logger.debug("moe_plugin triton experts: M=%d E=%d N=%d -> %s (%s)", m, num_local, n, cfg.to_dict(), cfg.source)
    return cfg


def resolve_routing_mode(cfg: LaunchConfig, slots: int) -> str:
    """``"slot"`` or ``"sorted"``: what ``cfg.routing`` means for ``slots`` routed slots."""
    if slots > SLOT_ROUTING_MAX_SLOTS:
        return "sorted"
    if cfg.routing == "auto":
        return "slot" if slots <= 64 else "sorted"
    return cfg.routing


__all__ = [
    "CONFIG_DIR_ENV",
    "FORCE_CONFIG_ENV",
    "GemmLaunch",
    "LaunchConfig",
    "config_file_name",
    "dtype_tag",
    "get_launch_config",
    "heuristic_config",
    "heuristic_for_rows",
    "lookup_config_file",
    "resolve_routing_mode",
]
