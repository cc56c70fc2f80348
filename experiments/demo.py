"""The seed's cost example and every family on one layer, in a few seconds.

    python experiments/demo.py [--channels 256] [--hw 32] [--fraction 0.25]

Expected runtime: under 30 s on 2 CPU cores (mostly JIT compilation of the projections).

Prints (1) the worked example of docs/design.md (6×6×3 input, five 3×3×3 filters, VALID: full conv
2160 MACs, depthwise-separable 432 + 240 = 672) and (2) for one 3×3 layer, every family at the
largest rank within ``--fraction`` of the full kernel's parameters: its chain, parameters, MACs
(conventional and as ``count_macs`` traces them) and the relative error of projecting a kernel.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import factorize as fz


def seed_example() -> None:
    full = fz.conv_macs((3, 3, 3, 5), 6, padding="VALID")
    f = fz.random_factorized(jax.random.PRNGKey(0), (3, 3, 3, 5), "dsc", 1)
    dw, pw = f.stages
    dw_macs = fz.conv_macs(dw.shape, 6, padding="VALID", groups=dw.groups)
    pw_macs = fz.conv_macs(pw.shape, 4, padding="VALID")
    print("Seed example: 6×6×3 input, five 3×3×3 filters, VALID → 4×4×5")
    print(f"  full conv            {full:5d} MACs  (27 taps·channels × 16 positions × 5 filters)")
    print(f"  depthwise 3×3        {dw_macs:5d} MACs  (9 × 16 × 3)")
    print(f"  pointwise 1×1        {pw_macs:5d} MACs  (3 × 16 × 5)")
    print(f"  depthwise-separable  {f.macs(6, padding='VALID'):5d} MACs  "
          f"= {f.macs(6, padding='VALID') / full:.3f} of the full conv\n")


def family_table(channels: int, hw: int, fraction: float) -> None:
    shape = (3, 3, channels, channels)
    # A kernel with a decaying spectrum, like trained ones, rather than white noise.
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    smooth = jax.random.normal(key_a, (3, 3, channels, 8)) @ jax.random.normal(key_b, (8, channels))
    kernel = smooth / 8 + 0.3 * jax.random.normal(key_b, shape)
    full_macs = fz.conv_macs(shape, hw)
    x = jnp.zeros((1, hw, hw, channels))
    print(f"One 3×3 conv, C = N = {channels}, {hw}×{hw} input, SAME, stride 1; "
          f"each family at ≤ {fraction:g} of the parameters")
    header = f"{'family':12s} {'rank':>10s} {'params':>9s} {'MACs':>12s} {'MAC ratio':>9s} " \
             f"{'count_macs':>12s} {'rel. error':>10s}  chain"
    print(header)
    print("-" * len(header))
    for family in fz.FAMILIES:
        rank = None if family == "full" else fraction
        try:
            f = fz.decompose(kernel, family, rank, **({"n_iter": 25} if "cp" in family else {}))
            error = f"{float(fz.relative_error(kernel, f)):10.4f}"
        except NotImplementedError:
            f = fz.random_factorized(jax.random.PRNGKey(1), shape, family, rank)
            error = f"{'n/a':>10s}"
        macs = f.macs(hw)
        chain = " → ".join(f"{st.kind} {st.shape[0]}×{st.shape[1]}" for st in f.stages)
        print(f"{family:12s} {str(f.rank):>10s} {f.params:9d} {macs:12,d} "
              f"{macs / full_macs:9.3f} {fz.count_macs(f, x):12,d} {error}  {chain}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--hw", type=int, default=32)
    parser.add_argument("--fraction", type=float, default=0.25)
    args = parser.parse_args(argv)
    seed_example()
    family_table(args.channels, args.hw, args.fraction)


if __name__ == "__main__":
    main()
