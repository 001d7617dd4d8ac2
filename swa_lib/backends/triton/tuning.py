"""Layer 2, tuning: the autotuner around each kernel, pruned per GPU architecture.

Every architecture's configurations (:data:`swa_lib.backends.triton_arch.CONFIGS`) go into one
autotuner per kernel; its prune hook keeps those of the GPU it runs on whose shared memory
(:func:`~swa_lib.backends.triton_arch.smem_bytes`) fits that GPU. The tuning key buckets the
lengths and the window by powers of two (``TUNE_N``, ``TUNE_W``), so a new length reuses the
tuning of its bucket instead of benchmarking every configuration again. The interpreter never
autotunes (each trial would run the whole kernel in Python): it uses fixed small blocks.
"""

from __future__ import annotations

import triton

from ..triton_arch import CONFIGS, KINDS, arch_of, fitting, gpu_limits
from . import kernels
from .kernels import INTERPRETER

__all__ = ["autotune_configs", "set_descriptor_blocks", "prune", "bucket", "KERNELS"]

_FLAGS = ["HEAD_DIM", "GROUP", "HAS_DILATION", "HAS_SINKS", "HAS_GLOBAL", "VARLEN", "ONE_LOOP", "TMA", "PRECISION"]
_TUNE_KEY = {"fwd": ["TUNE_N", "TUNE_W", *_FLAGS, "FULL_ROWS"], "dq": ["TUNE_N", "TUNE_W", *_FLAGS, "FULL_ROWS"],
             "dkdv": ["TUNE_N", "TUNE_W", *_FLAGS, "COLUMNS"]}
# the TMA descriptors each kernel takes, and the block that sets their rows
_DESCRIPTORS = {"fwd": (("DESC_K", "DESC_V"), "BLOCK_N"), "dq": (("DESC_K", "DESC_V"), "BLOCK_N"),
                "dkdv": (("DESC_Q", "DESC_DO"), "BLOCK_M")}


def bucket(n: int) -> int:
    """The power of two at or above n (the autotuner's key for a length or a window)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def set_descriptor_blocks(kind: str, nargs: dict) -> None:
    """Give the kernel's TMA descriptors (if any) the tile shape of the blocks in nargs: a
    descriptor's block is part of it, so each configuration sets its own before it runs."""
    names, block = _DESCRIPTORS[kind]
    for name in names:
        desc = nargs.get(name)
        if desc is not None:
            desc.block_shape = [1, 1, nargs[block], nargs["HEAD_DIM"]]


def autotune_configs(kind: str, arch=None) -> list:
    """The autotuner's configurations for kernel ``kind`` ("fwd", "dq", "dkdv"): one
    architecture's (compute capability as 90 or (9, 0)), or the union over all of them."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if arch is None:
        settings = list(dict.fromkeys(c[:4] for a in sorted(CONFIGS) for c in CONFIGS[a][kind]))
    else:
        settings = [c[:4] for c in CONFIGS[arch_of(arch) if isinstance(arch, tuple) else arch][kind]]

    def hook(nargs):
        set_descriptor_blocks(kind, nargs)

    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s, pre_hook=hook)
            for bm, bn, w, s in settings]


def prune(kind: str, configs: list, capability: tuple, smem: int, head_dim: int, elem: int) -> list:
    """The configs of the GPU's architecture that fit its shared memory, in its order."""
    keep = fitting(kind, arch_of(capability), head_dim, elem, smem)
    chosen = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in keep]
    if not chosen:  # the capability table refuses such calls; this is the last guard
        raise ValueError(f"no {kind} configuration fits {smem} bytes of shared memory for head dim {head_dim}")
    return chosen


def _prune_hook(kind: str):
    def early_config_prune(configs, named_args, **kwargs):
        tensor = named_args["Q"]
        cap, _, smem = gpu_limits(tensor.device)
        return prune(kind, configs, cap, smem, kwargs["HEAD_DIM"], tensor.element_size())

    return early_config_prune


def _tuned(kind: str, kernel):
    if INTERPRETER:
        return kernel
    return triton.autotune(configs=autotune_configs(kind), key=_TUNE_KEY[kind],
                           prune_configs_by={"early_config_prune": _prune_hook(kind)})(kernel)


#: kind -> (plain kernel, autotuned kernel, the block its grid's first axis counts)
KERNELS = {
    "fwd": (kernels.fwd_kernel, _tuned("fwd", kernels.fwd_kernel), "BLOCK_M"),
    "dq": (kernels.bwd_dq_kernel, _tuned("dq", kernels.bwd_dq_kernel), "BLOCK_M"),
    "dkdv": (kernels.bwd_dkdv_kernel, _tuned("dkdv", kernels.bwd_dkdv_kernel), "BLOCK_N"),
}
