"""factorize: efficient conv blocks as exact low-rank factorizations of full conv kernels.

A depthwise-separable conv (MobileNet), a CP or Tucker-2 block, a spatially separable conv and a
1×1 bottleneck are each a chain of linear convs, hence one full kernel with a structure. This
package expresses every such block as exact factors of a full kernel (``decompose``,
``Factorized``), counts their cost (``conv_macs``, ``count_macs``) and provides Flax NNX layers
(``FactorizedConv``).
"""

from factorize.chain import Stage
from factorize.conversion.calibration import InputStats, collect_input_stats  # noqa: E402, I001
from factorize.costs import conv_macs, count_macs, xla_flops
from factorize.decompositions.rank import evbmf, select_rank
from factorize.decompositions.tensorly_interop import from_tensorly, to_tensorly
from factorize.factorized import (
    Factorized,
    decompose,
    decompose_many,
    from_factors,
    random_factorized,
    relative_error,
)
from factorize.families import FAMILIES, Family, get_family
from factorize.layers import FactorizedConv, conv_factory

__all__ = [
    "FAMILIES",
    "Factorized",
    "FactorizedConv",
    "Family",
    "InputStats",
    "Stage",
    "collect_input_stats",
    "conv_factory",
    "conv_macs",
    "count_macs",
    "decompose",
    "decompose_many",
    "evbmf",
    "from_factors",
    "from_tensorly",
    "get_family",
    "random_factorized",
    "relative_error",
    "select_rank",
    "to_tensorly",
    "xla_flops",
]
