"""swa_lib: sliding window attention from plain loops to a fused Triton kernel.

The one public entry point is :func:`sliding_window_attention`; the window semantics live in
:mod:`swa_lib.masks`. Importing swa_lib registers its backends and does nothing else (it never
imports Triton or sets ``TRITON_INTERPRET``).
"""

from .attention import make_pattern, sliding_window_attention
from .backends.blocked import band_attention, blocked_attention
from .backends.chunked import chunked_attention, chunked_band_attention
from .backends import Backend, available_backends, register_backend
from .backends.dense import dense_attention, sdpa_attention
from .masks import (
    CONVENTIONS,
    UNBOUNDED,
    AttentionPattern,
    from_flash_attn,
    from_hf,
    from_longformer,
    from_mistral,
    to_flash_attn,
    to_hf,
    to_longformer,
    to_mistral,
    window_mask,
)
from .backends.reference import loop_attention
from .distributed import sequence_parallel_attention, shard_bounds  # torch.distributed: no side effects
from .kv_cache import RollingKVCache, SinkKVCache
from .varlen import varlen_sliding_window_attention
from .longformer import LongformerAttentionConfig, LongformerSelfAttention
from .schedule import WindowSchedule, receptive_field_support, schedule_reach

__version__ = "0.1.0"

__all__ = [
    "sequence_parallel_attention",
    "shard_bounds",
    "RollingKVCache",
    "SinkKVCache",
    "sliding_window_attention",
    "varlen_sliding_window_attention",
    "window_mask",
    "AttentionPattern",
    "make_pattern",
    "loop_attention",
    "dense_attention",
    "sdpa_attention",
    "chunked_attention",
    "chunked_band_attention",
    "blocked_attention",
    "band_attention",
    "available_backends",
    "register_backend",
    "Backend",
    "CONVENTIONS",
    "UNBOUNDED",
    "from_longformer",
    "to_longformer",
    "from_mistral",
    "to_mistral",
    "from_flash_attn",
    "to_flash_attn",
    "from_hf",
    "to_hf",
    "LongformerAttentionConfig",
    "LongformerSelfAttention",
    "WindowSchedule",
    "receptive_field_support",
    "schedule_reach",
]


def __getattr__(name):
    # Lazy: ``swa_lib.triton_sliding_window_attention`` imports Triton (and fixes the interpreter
    # choice, see swa_lib.backends.triton) only when first used, never at ``import swa_lib``.
    if name == "triton_sliding_window_attention":
        from .backends.triton import triton_sliding_window_attention

        return triton_sliding_window_attention
    raise AttributeError(f"module 'swa_lib' has no attribute {name!r}")
