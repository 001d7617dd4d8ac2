"""The fused sliding window attention kernel in Triton: forward and backward, band-restricted.

Three layers: the ``@triton.jit`` code (:mod:`.tiles`: what one tile does and which tiles a
block needs; :mod:`.walks`: which tiles a program visits; :mod:`.kernels`: the four kernels,
with the design); :mod:`.launch`: checks a call against the backend's row of the capability
table, plans the launches and adds up split work, with :mod:`.tuning` (the autotuner, pruned
per architecture) and :mod:`.tilemap` (the loop bounds seen from Python); :mod:`.function`: the
autograd Function and the plain functions. :mod:`.compiled` compiles the kernels for a GPU
architecture without a GPU and reads registers, spills and shared memory. Everything public is
re-exported here.

Importing this package imports Triton. Without a GPU the kernels run in Triton's interpreter on
CPU, which must be chosen *before this package is first imported* by setting the environment
variable ``TRITON_INTERPRET=1``: Triton decides when it decorates the kernels (and reads it again
at launch, so leave it set), and :data:`INTERPRETER` records which mode the kernels got. Tested
with Triton 3.7 (interpreter, and compiled for sm_75/80/89/90 without a GPU) and compiled with
Triton 3.6; Triton 3.6's interpreter needs numpy < 2.4 (it converts one-element arrays to ints,
which numpy 2.4 refuses). No GPU has run these kernels yet.
"""

from __future__ import annotations

from .. import TRITON_HEAD_DIMS
from .function import (SlidingWindowAttentionFunction, triton_attention, triton_sliding_window_attention,
                       triton_varlen_attention)
from .kernels import INTERPRETER
from .launch import VARIANTS
from .tilemap import key_block_range, load_balance, program_tiles, query_block_range, visited_tiles
from .tuning import autotune_configs

__all__ = [
    "INTERPRETER",
    "SUPPORTED_HEAD_DIMS",
    "SlidingWindowAttentionFunction",
    "triton_sliding_window_attention",
    "triton_attention",
    "triton_varlen_attention",
    "VARIANTS",
    "autotune_configs",
    "load_balance",
    "program_tiles",
    "key_block_range",
    "query_block_range",
    "visited_tiles",
]

#: Head dims the kernel accepts: the capability table's, sorted (kept for the old name).
SUPPORTED_HEAD_DIMS = tuple(sorted(TRITON_HEAD_DIMS))
