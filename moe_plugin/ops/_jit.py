"""``@kernel``: a ``triton.jit`` that follows ``TRITON_INTERPRET`` at launch time, not at import time.

``triton.jit`` decides between compiling and interpreting when the decorator runs, i.e. when the module
is imported. The ops here dispatch per call (``_dispatch.use_triton``): a CPU tensor goes to a Triton
kernel only while ``TRITON_INTERPRET=1``. A kernel decorated before the variable was set would then be
handed CPU tensors by the compiled launcher and fail, so each kernel keeps both forms and picks one per
launch (and per device-function call, so ``@kernel`` helpers called from kernels work in both modes).

Triton's own library functions (``tl.zeros``, ``tl.sum``, ...) are ``triton.jit`` functions too, fixed in
whichever form was current when ``triton`` was imported; during an interpreted launch every ``JITFunction``
called as a device function is therefore run through the interpreter as well.

Without Triton installed ``kernel`` returns the plain function: the modules still import and the torch
fallbacks run (``use_triton`` is False there, so no kernel is ever launched).

The module also holds the device helpers the ops share. ``cast_for_store`` exists because Triton 3.9's
interpreter converts float32 to bfloat16 by truncation and to float8e4nv with a broken carry and
tie-breaking; kernels pass ``SOFT_ROUND=triton_interpreting()`` so that under the interpreter the value is
first rounded to nearest-even in integer arithmetic (after which the cast is exact), while compiled
kernels keep the hardware conversion (round-to-nearest-even on NVIDIA).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator

from ._dispatch import triton_interpreting

try:
    import triton.language as tl
    from triton.runtime.jit import JITFunction
except ImportError:  # torch-only installs
    tl = None
    JITFunction = None


if JITFunction is not None:
    # Keyed by id (a JITFunction's hash walks its dependencies, which fails while the language is patched);
    # the function is kept alive with its form so the id cannot be reused.
    _interpreted_forms: dict[int, tuple[Any, Any]] = {}
    _patch_lock = threading.RLock()
    _patch_depth = 0

    def _interpreted(fn: Any) -> Any:
        entry = _interpreted_forms.get(id(fn))
        if entry is None:
            from triton.runtime.interpreter import InterpretedFunction

            entry = _interpreted_forms[id(fn)] = (fn, InterpretedFunction(fn.fn))
        return entry[1]

    def _call_interpreted(self, *args, **kwargs):
        return _interpreted(self)(*args, **kwargs)

    @contextlib.contextmanager
    def _jit_calls_interpreted() -> Iterator[None]:
        global _patch_depth
        with _patch_lock:
            original = JITFunction.__call__
            if _patch_depth == 0:
                JITFunction.__call__ = _call_interpreted
            _patch_depth += 1
            try:
                yield
            finally:
                _patch_depth -= 1
                if _patch_depth == 0:
                    JITFunction.__call__ = original

    class _DualModeKernel(JITFunction):
        """A ``JITFunction`` (so the compiler treats it as one when inlining calls) that delegates to an
        ``InterpretedFunction`` of the same source whenever the interpreter is on."""

        def run(self, *args, grid, warmup, **kwargs):
            if triton_interpreting():
                with _jit_calls_interpreted():
                    return _interpreted(self).run(*args, grid=grid, warmup=warmup, **kwargs)
            return super().run(*args, grid=grid, warmup=warmup, **kwargs)

        def __call__(self, *args, **kwargs):
            if triton_interpreting():
                return _interpreted(self)(*args, **kwargs)
            return super().__call__(*args, **kwargs)


def kernel(fn: Callable[..., Any]) -> Any:
    """Decorator used instead of ``@triton.jit`` for every kernel and device function of ``moe_plugin.ops``."""
    if JITFunction is None:
        return fn
    return _DualModeKernel(fn)


@kernel
def round_fp32_to_bf16_grid(x):
    """The bfloat16 nearest to fp32 ``x`` (ties to even), still as fp32; NaN passes through."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return tl.where(x == x, bits.to(tl.float32, bitcast=True), x)


@kernel
def round_fp32_to_e4m3_grid(x):
    """The float8_e4m3fn value nearest to fp32 ``x`` (ties to even), as fp32; ``|x| <= 448`` expected."""
    bits = x.to(tl.int32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF) - 127
    # Spacing of the e4m3 grid around x: 2^(e - 3) for normals, 2^-9 below 2^-6 (subnormals).
    ulp_exp = tl.maximum(exponent, -6) - 3
    ulp = ((ulp_exp + 127) << 23).to(tl.float32, bitcast=True)
    inv_ulp = ((127 - ulp_exp) << 23).to(tl.float32, bitcast=True)
    scaled = x * inv_ulp
    # Adding and removing 1.5 * 2^23 rounds |scaled| < 2^22 to an integer, ties to even.
    rounded = ((scaled + 12582912.0) - 12582912.0) * ulp
    signed = rounded.to(tl.int32, bitcast=True) | (bits & -2147483648)
    return signed.to(tl.float32, bitcast=True)


@kernel
def fp8_group_quant(x, eps, USE_UE8M0: tl.constexpr):
    """Per-row FP8 (e4m3) quantization of fp32 ``x [rows, group]``, as ``ops.quant`` does on the host:
    ``(q, scale)`` with ``scale = max(amax, eps) / 448`` and ``q = clamp(x * (1 / scale), -448, 448)`` (still
    fp32). One IEEE division per row, then a multiply per element: a division per element made the
    quantizing kernels instruction-bound (Nsight Compute: the quantizing ep_scatter at SM 74-78 %, DRAM 44-56 %)."""
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), eps)
    scale = tl.math.div_rn(amax, 448.0)
    if USE_UE8M0:
        # Round up to a power of two exactly: any mantissa bit set moves to the next exponent.
        bits = scale.to(tl.int32, bitcast=True)
        bits = tl.where((bits & 0x7FFFFF) != 0, (bits & -8388608) + 0x800000, bits)
        scale = bits.to(tl.float32, bitcast=True)
    q = x * inverse_scale(scale)[:, None]
    q = tl.minimum(tl.maximum(q, -448.0), 448.0)
    return q, scale


@kernel
def inverse_scale(scale):
    """``1 / scale`` rounded once (IEEE), as ``ops.quant`` computes it: a scale below the smallest normal fp32
    counts as that one, whose reciprocal is finite (an overflow to inf made zeros 0 * inf = NaN)."""
    return tl.math.div_rn(1.0, tl.maximum(scale, 1.1754943508222875e-38))


@kernel
def load_valid_count(valid_ptr, upper):
    """A device-side token count clamped to ``[0, upper]``, as int32. Clamped before the cast: an int64
    count past 2**31 must not wrap to a small one."""
    return tl.minimum(tl.maximum(tl.load(valid_ptr), 0), upper).to(tl.int32)


@kernel
def cast_for_store(x, dtype: tl.constexpr, SOFT_ROUND: tl.constexpr):
    """``x.to(dtype)`` with round-to-nearest-even also under the interpreter (see the module docstring)."""
    if SOFT_ROUND:
        if dtype == tl.bfloat16:
            x = round_fp32_to_bf16_grid(x.to(tl.float32))
        elif dtype == tl.float8e4nv:
            x = round_fp32_to_e4m3_grid(x.to(tl.float32))
    return x.to(dtype)
