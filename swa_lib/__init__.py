"""swa_lib: sliding window attention from plain loops to a fused Triton kernel.

The one public entry point is :func:`sliding_window_attention`; the window semantics live in
:mod:`swa_lib.masks`. Importing swa_lib registers its backends and does nothing else (it never
imports Triton or sets ``TRITON_INTERPRET``).
"""

from .attention import make_pattern, sliding_window_attention
from .backends import Backend, available_backends, register_backend
from .dense import dense_attention, sdpa_attention
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
from .reference import loop_attention
from .longformer import LongformerAttentionConfig, LongformerSelfAttention
from .schedule import WindowSchedule, receptive_field_support, schedule_reach
from . import _registry  # noqa: F401  (registers the built-in backends)

__version__ = "0.1.0"

__all__ = [
    "sliding_window_attention",
    "window_mask",
    "AttentionPattern",
    "make_pattern",
    "loop_attention",
    "dense_attention",
    "sdpa_attention",
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
