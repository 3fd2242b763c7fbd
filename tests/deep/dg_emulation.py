"""CPU stand-ins for DeepGEMM's two grouped FP8 GEMMs, written from DeepGEMM's documented contract.

Only the library call is replaced (``_gemm``), and weights are prepared as on SM90 (no CUDA needed); the
layout logic around it is the production code. The math is the plain dequantize-then-multiply definition,
so it is an independent reference for what the kernels compute.
"""

from __future__ import annotations

import torch

from moe_plugin.experts.batched_deep_gemm import BatchedDeepGemmExperts
from moe_plugin.experts.deep_gemm import DeepGemmExperts, prepare_deep_gemm_weights
from moe_plugin.ops.quant import dequant_block_weight, dequant_per_token_group


def _dequant_rows(a: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return dequant_per_token_group(a, scale, 128)


class EmulatedDeepGemmExperts(DeepGemmExperts):
    """``m_grouped_fp8_gemm_nt_contiguous``: row r uses expert ``m_indices[r]``; rows with -1 are skipped."""

    def prepare_weights(self, weights):
        return self.weight_cache.get(weights, lambda w: prepare_deep_gemm_weights(w, 9, None))

    def _gemm(self, a, a_scale, w, w_scale, out, m_indices):
        assert a.shape[0] == out.shape[0] == m_indices.shape[0] and m_indices.dtype == torch.int32
        x = _dequant_rows(a, a_scale)
        for e in range(w.shape[0]):
            rows = (m_indices == e).nonzero().flatten()
            if rows.numel():
                out[rows] = (x[rows] @ dequant_block_weight(w[e], w_scale[e], (128, 128)).t()).to(out.dtype)


class EmulatedBatchedDeepGemmExperts(BatchedDeepGemmExperts):
    """``m_grouped_fp8_gemm_nt_masked``: group e computes its first ``masked_m[e]`` rows."""

    def __init__(self, config):
        super().__init__(config)
        self.expected_ms: list[int] = []

    def prepare_weights(self, weights):
        return self.weight_cache.get(weights, lambda w: prepare_deep_gemm_weights(w, 9, None))

    def _gemm(self, a, a_scale, w, w_scale, out, masked_m, expected_m):
        assert masked_m.dtype == torch.int32 and masked_m.shape == (a.shape[0],)
        self.expected_ms.append(expected_m)
        for e, count in enumerate(masked_m.tolist()):
            if count:
                x = _dequant_rows(a[e, :count], a_scale[e, :count])
                out[e, :count] = (x @ dequant_block_weight(w[e], w_scale[e], (128, 128)).t()).to(out.dtype)
