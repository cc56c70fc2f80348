"""Sums over major axes that XLA:CPU runs vectorized.

XLA:CPU emits scalar loops for a reduction over leading axes that keeps a long minor axis
(e.g. ``Σ_{b,h,w} window · g`` in a depthwise kernel gradient, or ``Σ_k q[k, c, r]·kr[k, r]``
in CP-ALS), about 1 G elements/s; summing by pairwise halving makes every level one contiguous,
vectorized elementwise add.
"""

from __future__ import annotations

import jax


def tree_sum(a: jax.Array) -> jax.Array:
    """``a.sum(0)`` by pairwise halving (a multiply feeding it fuses into the first level).

    Measured on 2 CPU cores: the depthwise kernel gradient (3×3, batch 32) went from 14–28 ms
    to 1.3–1.6 ms at C = 128, 16×16; CP-ALS's ``Σ_n p[k, n, r] v[n, r]`` for (9, 512, 572) from
    21 ms (``einsum``) to 1.3 ms.
    """
    while a.shape[0] > 1:
        half = a.shape[0] // 2
        top = a[:half] + a[half : 2 * half]
        if a.shape[0] % 2:
            top = top.at[0].add(a[2 * half])
        a = top
    return a[0]
