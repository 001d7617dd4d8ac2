"""The backends, and the one table of what each can run.

Every backend is ``fn(q, k, v, pattern, scale) -> out`` on tensors :mod:`swa_lib.attention` has
validated. Each ``register_backend`` call below is one row of the capability table
(:class:`~swa_lib.backends.registry.Backend`): the registry reads it to choose a backend for
``backend="auto"`` and to refuse a call a backend cannot run, the Triton launcher reads its own
row, and the API page of the book prints the table. Priorities: higher is preferred by ``"auto"``.

Modules: ``registry`` (the row type and the choice), ``common`` (rules every backend follows),
``reference`` (the loop oracle), ``dense`` (masked full attention and SDPA), ``chunked``
(Longformer's chunks), ``blocked`` (query blocks against key bands), ``extensions`` (dilation,
global tokens and sinks on top of a band kernel), ``triton`` (the fused GPU kernel, imported
only when used), ``triton_arch`` (what that kernel needs per GPU architecture; Triton-free).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

from .blocked import blocked_attention
from .chunked import chunked_attention
from .common import compute_dtype, refuse_double_backward
from .dense import dense_attention, sdpa_attention
from .reference import loop_attention
from .registry import BACKENDS, Backend, available_backends, choose_backend, get_backend, register_backend
from . import triton_arch

__all__ = ["Backend", "BACKENDS", "register_backend", "get_backend", "available_backends", "choose_backend",
           "compute_dtype", "refuse_double_backward", "TRITON_HEAD_DIMS"]

# The oracle: slow, exact, never picked automatically.
register_backend(Backend("loop", loop_attention, priority=0, auto=False))
# Masked full attention, spelled out. O(N^2) memory.
register_backend(Backend("dense", dense_attention, priority=10, max_auto_len=8192))
# The same through PyTorch's fused SDPA kernels (still a materialised O(N^2) mask).
register_backend(Backend("sdpa", sdpa_attention, priority=20, max_auto_len=8192, wide_windows=True))
# Longformer's overlapping chunks + skew: O(N * w) memory, about 2x the band's useful work.
register_backend(Backend("chunked", chunked_attention, priority=30))  # dilation/global/sinks: .extensions
# Query blocks x one contiguous key band each: the CPU workhorse.
register_backend(Backend("blocked", blocked_attention, priority=40))  # dilation/global/sinks: .extensions


# The fused Triton kernel (swa_lib/backends/triton/), imported lazily: importing swa_lib never
# imports Triton. Compiled, it runs on CUDA tensors and "auto" may pick it there. On CPU it runs
# only in Triton's interpreter, which a user selects by setting TRITON_INTERPRET=1 before
# swa_lib.backends.triton is first imported; "auto" never picks the (slow) interpreter.

#: Head dims the kernel is compiled for (tl.arange needs a power of two; 256 fits shared memory).
TRITON_HEAD_DIMS = frozenset({16, 32, 64, 128, 256})


def _triton_devices() -> frozenset:
    """{"cuda"} (compiled), {"cpu"} (interpreter) or {} when the Triton backend cannot run here."""
    mod = sys.modules.get("swa_lib.backends.triton")
    if mod is None:
        interpreter = os.environ.get("TRITON_INTERPRET") == "1"
        if not interpreter and not torch.cuda.is_available():
            return frozenset()  # nothing to run on: do not even import triton
        if importlib.util.find_spec("triton") is None:
            return frozenset()
        try:
            import triton  # noqa: F401  (an installed but broken triton must not count)
        except Exception:
            return frozenset()
    else:
        interpreter = mod.INTERPRETER  # fixed when the kernels were decorated
    if interpreter:
        return frozenset({"cpu"})
    return frozenset({"cuda"}) if torch.cuda.is_available() else frozenset()


def _triton_attention(q, k, v, pattern, scale):
    from .triton import triton_attention

    return triton_attention(q, k, v, pattern, scale)


register_backend(Backend(
    "triton", _triton_attention, priority=50,
    dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
    # Triton's CPU interpreter computes bfloat16 tl.dot wrongly (triton 3.9): fp16/fp32 there.
    device_dtypes={"cpu": frozenset({torch.float16, torch.float32})},
    head_dims=TRITON_HEAD_DIMS, same_value_dim=True, cross_length=True,
    devices_now=_triton_devices,
    auto_devices=frozenset({"cuda"}),
    # per architecture (triton_arch.py): a configuration must fit the GPU's shared memory, and
    # before sm_80 Triton's dots run without tensor cores, where SDPA is the better choice
    device_limits=triton_arch.unfit_reason,
    min_auto_capability=triton_arch.MIN_AUTO_CAPABILITY,
))
