"""Tucker-2 on the channel modes of a conv kernel (Kim et al. 2016)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _leading_left_vectors(m: jax.Array, rank: int) -> jax.Array:
    u, _, _ = jnp.linalg.svd(m, full_matrices=False)
    return u[:, :rank]


def tucker2_project(kernel: jax.Array, rank: tuple[int, int], **options):
    """HOSVD: the leading singular vectors of the mode-C and mode-N unfoldings, and the core.

    Returns ``((U_in as 1×1 C→R1), core kh×kw R1→R2, (U_out^T as 1×1 R2→N)), info``.
    """
    if options:
        raise TypeError(f"tucker2 takes no projection options yet, got {sorted(options)}")
    kh, kw, c, n = kernel.shape
    r1, r2 = rank
    u_in = _leading_left_vectors(kernel.transpose(2, 0, 1, 3).reshape(c, -1), r1)
    u_out = _leading_left_vectors(kernel.transpose(3, 0, 1, 2).reshape(n, -1), r2)
    core = jnp.einsum("hwcn,cr,ns->hwrs", kernel, u_in, u_out)
    return (u_in.reshape(1, 1, c, r1), core, u_out.T.reshape(1, 1, r2, n)), {}
