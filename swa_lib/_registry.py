"""Registers the built-in backends (imported once by swa_lib/__init__.py).

Priorities: higher is preferred by ``backend="auto"``. Each later backend module (chunked,
triton, ...) adds one ``register_backend`` call here.
"""

from .backends import Backend, register_backend
from .blocked import blocked_attention
from .chunked import chunked_attention
from .dense import dense_attention, sdpa_attention
from .reference import loop_attention

# The oracle: slow, exact, never picked automatically.
register_backend(Backend("loop", loop_attention, priority=0, auto=False))
# Masked full attention, spelled out. O(N^2) memory.
register_backend(Backend("dense", dense_attention, priority=10, max_auto_len=8192))
# The same through PyTorch's fused SDPA kernels (still a materialised O(N^2) mask).
register_backend(Backend("sdpa", sdpa_attention, priority=20, max_auto_len=8192, wide_windows=True))
# Longformer's overlapping chunks + skew: O(N * w) memory, about 2x the band's useful work.
register_backend(Backend("chunked", chunked_attention, priority=30))  # dilation/global/sinks: swa_lib.extensions
# Query blocks x one contiguous key band each: the CPU workhorse.
register_backend(Backend("blocked", blocked_attention, priority=40))  # dilation/global/sinks: swa_lib.extensions


# The fused Triton kernel (swa_lib/triton_kernel.py), imported lazily: importing swa_lib never
# imports Triton. Compiled, it runs on CUDA tensors and "auto" may pick it there. On CPU it runs
# only in Triton's interpreter, which a user selects explicitly by setting TRITON_INTERPRET=1
# before swa_lib.triton_kernel is first imported; "auto" never picks the (slow) interpreter.
import torch  # noqa: E402


def _triton_mode():
    """"cuda", "cpu" (interpreter) or None when the Triton backend cannot run here."""
    import importlib.util
    import os
    import sys

    mod = sys.modules.get("swa_lib.triton_kernel")
    if mod is None:
        interpreter = os.environ.get("TRITON_INTERPRET") == "1"
        if not interpreter and not torch.cuda.is_available():
            return None  # nothing to run on: do not even import triton
        if importlib.util.find_spec("triton") is None:
            return None
        try:
            import triton  # noqa: F401  (an installed but broken triton must not count)
        except Exception:
            return None
    else:
        interpreter = mod.INTERPRETER  # fixed when the kernels were decorated
    if interpreter:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else None


def _triton_attention(q, k, v, pattern, scale):
    from .triton_kernel import triton_attention

    return triton_attention(q, k, v, pattern, scale)


class _TritonBackend(Backend):
    """The device rule depends on the mode (compiled CUDA or CPU interpreter), found at call time."""

    @property
    def auto(self):
        return self._auto and _triton_mode() == "cuda"

    @auto.setter
    def auto(self, value):  # used by the dataclass __init__
        object.__setattr__(self, "_auto", value)

    def unsupported(self, q, k, pattern):
        mode = _triton_mode()
        if mode is not None and q.device.type != mode:
            return (f"backend 'triton' runs on {mode!r} tensors in this process, got {q.device.type!r} "
                    "(CPU needs TRITON_INTERPRET=1 before swa_lib.triton_kernel is imported)")
        if mode == "cpu" and q.dtype not in (torch.float16, torch.float32):
            return f"backend 'triton' in Triton's CPU interpreter supports float16 and float32, got {q.dtype}"
        return super().unsupported(q, k, pattern)


register_backend(
    _TritonBackend("triton", _triton_attention, priority=50, devices=frozenset({"cuda", "cpu"}),
                   dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
                   cross_length=False, is_available=lambda: _triton_mode() is not None)
)
