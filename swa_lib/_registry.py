"""Registers the built-in backends (imported once by swa_lib/__init__.py).

Priorities: higher is preferred by ``backend="auto"``. Each later backend module (chunked,
triton, ...) adds one ``register_backend`` call here.
"""

from .backends import Backend, register_backend
from .dense import dense_attention, sdpa_attention
from .reference import loop_attention

# The oracle: slow, exact, never picked automatically.
register_backend(Backend("loop", loop_attention, priority=0, auto=False))
# Masked full attention, spelled out. O(N^2) memory.
register_backend(Backend("dense", dense_attention, priority=10, max_auto_len=8192))
# The same through PyTorch's fused SDPA kernels (still a materialised O(N^2) mask).
register_backend(Backend("sdpa", sdpa_attention, priority=20, max_auto_len=8192))
