"""What the Triton kernel needs from a GPU, per architecture: the autotune configurations and
their shared memory. Triton-free, so the capability table (:mod:`swa_lib.backends`) can refuse a
launch that cannot fit and the launcher (:mod:`swa_lib.backends.triton.tuning`) can prune its
autotuner with the same numbers.

The lists are compile-time evidence, not measurements: every configuration that sm_80 or sm_90
may pick at ``D = 64`` or ``128`` compiles without register spills, and every sm_90 dot becomes
``wgmma`` (``tests/test_triton_compile.py`` checks it, per kernel, dtype and head dim, with the
ptxas that ships with Triton; a configuration that spilled serves only smaller head dims or was
taken off). :func:`smem_bytes` is an upper bound of the shared memory Triton allocates (the
same test compares it with the compiled kernels). No GPU has timed them yet.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

__all__ = ["ARCHS", "CONFIGS", "KINDS", "MIN_AUTO_CAPABILITY", "Arch", "arch_of", "gpu_limits", "smem_bytes",
           "fitting", "unfit_reason"]

KINDS = ("fwd", "dq", "dkdv")


class Arch(NamedTuple):
    """One GPU architecture: a typical GPU, its shared memory per block (opt-in) and whether
    Triton's dots use tensor cores there (sm_75: Triton falls back to FMA)."""

    gpu: str
    smem: int
    tensor_cores: bool


#: compute capability (major * 10 + minor) -> Arch. Shared memory from CUDA's tables.
ARCHS = {
    75: Arch("T4", 64 * 1024, False),
    80: Arch("A100", 163 * 1024, True),
    86: Arch("A10, RTX 30xx", 99 * 1024, True),
    89: Arch("L4, RTX 40xx", 99 * 1024, True),
    90: Arch("H100", 227 * 1024, True),
}

#: Below this, "auto" leaves the kernel alone: on sm_75 Triton's dots run on FMA units, and
#: PyTorch's SDPA kernels are the better choice there.
MIN_AUTO_CAPABILITY = (8, 0)

# (BLOCK_M, BLOCK_N, num_warps, num_stages, largest head dim) per kernel, in order of preference:
# a configuration serves head dims up to its last number (above it, it spilled when compiled).
# sm_86 and sm_89 take sm_80's list, pruned to their smaller shared memory. On sm_90 every
# configuration has BLOCK_M >= 64 (BLOCK_N >= 64 for dk/dv, whose tiles are transposed), the
# smallest tile a warpgroup's wgmma takes; on sm_75 small tiles for FMA (no tensor cores).
_AMPERE = {
    "fwd": [(128, 64, 8, 3, 64), (64, 64, 8, 3, 128), (128, 32, 8, 2, 128), (64, 32, 4, 2, 256),
            (32, 32, 4, 1, 256)],
    "dq": [(64, 64, 8, 2, 128), (128, 32, 8, 2, 128), (64, 32, 4, 2, 128), (32, 32, 4, 2, 256)],
    "dkdv": [(128, 32, 8, 2, 128), (64, 32, 4, 2, 128), (32, 128, 8, 2, 64), (32, 32, 4, 2, 256)],
}
# sm_86/sm_89: the same, but dk/dv's 128 x 32 tile spilled 24 bytes at D = 128 there
_ADA = dict(_AMPERE, dkdv=[(128, 32, 8, 2, 64), (64, 32, 4, 2, 128), (32, 128, 8, 2, 64), (32, 32, 4, 2, 256)])
CONFIGS = {
    75: {"fwd": [(32, 32, 4, 2, 256), (16, 32, 4, 2, 256)],
         "dq": [(16, 32, 4, 2, 256), (32, 32, 4, 2, 256)],
         "dkdv": [(16, 32, 4, 2, 256), (32, 32, 4, 2, 256)]},
    80: _AMPERE,
    86: _ADA,
    89: _ADA,
    90: {"fwd": [(128, 64, 8, 3, 128), (128, 128, 8, 2, 128), (64, 128, 8, 3, 128), (64, 32, 4, 1, 256)],
         "dq": [(128, 64, 8, 2, 128), (64, 64, 4, 3, 128), (64, 128, 8, 2, 128), (64, 32, 4, 1, 256)],
         "dkdv": [(32, 128, 8, 2, 128), (64, 64, 8, 3, 128), (64, 128, 8, 2, 64), (32, 64, 4, 1, 256)]},
}


def arch_of(capability: tuple) -> int:
    """The listed architecture whose configurations a GPU of this capability uses: the newest
    listed one not newer than it (sm_87 -> sm_80, sm_100 -> sm_90)."""
    cc = capability[0] * 10 + capability[1]
    known = [a for a in ARCHS if a <= cc]
    if not known:
        raise ValueError(f"the Triton kernel needs compute capability 7.5 or newer, got {capability}")
    return max(known)


def gpu_limits(device) -> tuple:
    """``(capability, arch, smem)`` of a CUDA device: its compute capability ``(major, minor)``,
    the listed architecture it uses (:func:`arch_of`) and its shared memory per block (the opt-in
    limit its properties report, else the architecture's)."""
    import torch

    props = torch.cuda.get_device_properties(device)
    cap = (props.major, props.minor)
    arch = arch_of(cap)
    return cap, arch, getattr(props, "shared_memory_per_block_optin", ARCHS[arch].smem)


def smem_bytes(kind: str, block_m: int, block_n: int, stages: int, head_dim: int, elem: int, arch: int) -> int:
    """Upper bound of the shared memory one program of ``kind`` needs on ``arch``, in bytes.

    The tiles the pipeline streams (forward and dq: a key and a value tile; dk/dv: a query and a
    dO tile), ``stages`` copies each (one fewer on sm_80-89); the tiles the program keeps (q; q
    and dO; k and v), twice over in fp32 (3xTF32 splits each operand in two); and staging for
    the score tile (on sm_75, whose dots run on FMA units, up to 16 bytes a score). Fitted to the
    compiled kernels (sm_75/80/89/90, D = 64 and 128) with a margin; the compile test checks
    that it stays an upper bound."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    own, move = (block_m, block_n) if kind != "dkdv" else (block_n, block_m)
    buffers = max(stages - 1, 1) if 80 <= arch < 90 else stages
    split = 2 if elem == 4 else 1  # fp32 dots as 3xTF32 keep a high and a low part of operands
    streamed = buffers * 2 * move * head_dim * elem * (4 + split) // 5
    kept = (1 if kind == "fwd" else 2) * own * head_dim * elem * split
    scores = block_m * block_n * (16 if arch < 80 else elem * 5 // 4)
    return streamed + kept + scores + 2048


def fitting(kind: str, arch: int, head_dim: int, elem: int, smem: Optional[int] = None) -> list:
    """The configurations ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` of ``arch`` that serve
    ``head_dim`` and whose :func:`smem_bytes` fits ``smem`` (default: the architecture's), in
    order of preference."""
    limit = ARCHS[arch].smem if smem is None else smem
    return [c[:4] for c in CONFIGS[arch][kind]
            if head_dim <= c[4] and smem_bytes(kind, c[0], c[1], c[3], head_dim, elem, arch) <= limit]


def unfit_reason(q, k, v=None) -> Optional[str]:
    """Why the kernel cannot run this call on its GPU (no configuration of a kernel it needs
    fits the GPU's shared memory; the backward kernels only when a gradient is needed), or None.
    Only CUDA tensors are asked; the interpreter has no such limit."""
    if q.device.type != "cuda":
        return None
    import torch

    cap, arch, smem = gpu_limits(q.device)
    d, elem = q.shape[-1], q.element_size()
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v))
    short = [kind for kind in (KINDS if grad else KINDS[:1]) if not fitting(kind, arch, d, elem, smem)]
    if short:
        return (f"backend 'triton' has no kernel configuration for head dim {d} in {q.dtype} that fits the "
                f"{smem // 1024} KiB of shared memory of this GPU (sm_{cap[0]}{cap[1]}; kernels {short})")
    return None
