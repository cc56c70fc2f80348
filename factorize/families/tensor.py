"""The families fitted by tensor decompositions: Tucker-2 and CP (3-way and 4-way).

Their chains live here; the decompositions that fit them live in ``factorize.decompositions``.
"""

from __future__ import annotations

import math

from factorize.chain import Stage
from factorize.decompositions import cp3_project, cp4_project, tucker2_project
from factorize.families.base import Family, int_rank_path
from factorize.families.data_aware import channel_whitened

HW = (True, True)
NONE = (False, False)


def _tucker2_path(s):
    """Ranks (R_in, R_out) growing in proportion to (C, N), for parameter fractions."""
    c, n = s[2], s[3]
    big = max(c, n)
    path = []
    for t in range(1, big + 1):
        r = (max(1, round(t * c / big)), max(1, round(t * n / big)))
        if not path or path[-1] != r:
            path.append(r)
    return path


TUCKER2 = Family(
    name="tucker2",
    chain=lambda s, r: (
        Stage((1, 1, s[2], r[0]), 1, NONE),
        Stage((s[0], s[1], r[0], r[1]), 1, HW),
        Stage((1, 1, r[1], s[3]), 1, NONE),
    ),
    max_rank=lambda s: (s[2], s[3]),
    exact_rank=lambda s: (min(s[2], s[0] * s[1] * s[3]), min(s[3], s[0] * s[1] * s[2])),
    project=tucker2_project,
    project_whitened=channel_whitened(tucker2_project),
    rank_path=_tucker2_path,
    summary="1×1 C→R1, kh×kw R1→R2, 1×1 R2→N (Tucker-2, Kim et al. 2016)",
)


def _cp3_max(s):
    # Any tensor's CP rank is at most its size over its largest mode.
    dims = (s[0] * s[1], s[2], s[3])
    return math.prod(dims) // max(dims)


def _cp4_max(s):
    return math.prod(s) // max(s)


CP3 = Family(
    name="cp3",
    chain=lambda s, r: (
        Stage((1, 1, s[2], r), 1, NONE),
        Stage((s[0], s[1], 1, r), r, HW),
        Stage((1, 1, r, s[3]), 1, NONE),
    ),
    max_rank=_cp3_max,
    exact_rank=lambda s: None,
    project=cp3_project,
    project_whitened=channel_whitened(cp3_project),
    rank_path=int_rank_path(_cp3_max),
    summary="1×1 C→R, depthwise kh×kw on R, 1×1 R→N (CP of (kh·kw, C, N); MobileNetV2-like)",
)

CP4 = Family(
    name="cp4",
    chain=lambda s, r: (
        Stage((1, 1, s[2], r), 1, NONE),
        Stage((s[0], 1, 1, r), r, (True, False)),
        Stage((1, s[1], 1, r), r, (False, True)),
        Stage((1, 1, r, s[3]), 1, NONE),
    ),
    max_rank=_cp4_max,
    exact_rank=lambda s: None,
    project=cp4_project,
    project_whitened=channel_whitened(cp4_project),
    rank_path=int_rank_path(_cp4_max),
    summary=(
        "1×1 C→R, depthwise kh×1, depthwise 1×kw, 1×1 R→N (CP of the kernel, Lebedev et al. 2015)"
    ),
)
