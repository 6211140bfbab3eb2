"""One tile of keys in a flash-attention loop (Triton): the step both split-key kernels share.

Scores of a block of query rows against BLOCK_N keys, masked by ``seen`` (row, key), folded into
the running max ``m_i``, sum ``l_i`` and output ``acc`` (online softmax; K and V read once).
Rows that have seen no key yet keep m = -inf and contribute nothing.
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

if triton is not None:
    @triton.jit
    def key_tile(q, k_ptr, v_ptr, h, stride_kh, stride_kn, stride_vh, stride_vn, offs, cols, valid,
                 seen, m_i, l_i, acc, scale, IEEE: tl.constexpr):
        kt = tl.load(k_ptr + h * stride_kh + offs[:, None] * stride_kn + cols[None, :],
                     mask=valid[:, None], other=0.0)
        if IEEE:  # float32 runners (tests): no TF32 rounding
            sc = tl.dot(q, tl.trans(kt), input_precision="ieee") * scale
        else:
            sc = tl.dot(q, tl.trans(kt)) * scale
        sc = tl.where(seen, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
        p = tl.exp(sc - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        vt = tl.load(v_ptr + h * stride_vh + offs[:, None] * stride_vn + cols[None, :],
                     mask=valid[:, None], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        l_i = l_i * alpha + tl.sum(p, 1)
        return m_new, l_i, acc
