"""Compile the kernels for a GPU architecture without a GPU, exactly as a launch would, and read
what the compiled code costs: registers, spills, shared memory, and which matrix instructions
the dots became (``wgmma`` on Hopper, ``mma.sync`` on Ampere, neither on sm_75, where Triton's
dots run on FMA units).

A launch specialises its arguments before it compiles (a stride equal to 1 becomes a constant,
integers and pointers divisible by 16 get divisibility hints, TMA descriptors their tile shape).
:func:`compile_launch` plans a real call on CPU tensors with :mod:`.launch` and runs Triton's own
specialisation (the binder a launch uses) for the target, so the kernel compiled here is the one
a GPU would run. Registers and spills come from the log of the ``ptxas`` that ships with Triton.
These are compile-time facts, a proxy for speed, not a measurement of it.

Needs the compiled mode (``TRITON_INTERPRET`` unset) and Triton's NVIDIA backend; works with
Triton 3.6 and 3.7. ``python -m swa_lib.backends.triton.compiled`` prints the table.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys

import torch

from ...masks import AttentionPattern
from ..triton_arch import KINDS, fitting
from .kernels import INTERPRETER
from .launch import Prepared, backward_plan, forward_plan
from .tuning import KERNELS, set_descriptor_blocks

__all__ = ["plan_launch", "specialize", "compile_launch", "report_row", "autotuner_jobs", "pick_jobs",
           "design_jobs", "compile_all"]

_PTXAS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads.*?Used (\d+) registers", re.S)


def plan_launch(kind: str, dtype: torch.dtype, head_dim: int, config: tuple, *, part: str = "band",
                pattern: AttentionPattern = AttentionPattern(256, 0), n: int = 4096, heads=(4, 4),
                variant: str = "current", tma: bool = False):
    """The launch of kernel ``kind`` that a call would make, planned on CPU tensors: (launch,
    keyword arguments with the configuration). ``part``: "band", or "split" (the full-row or
    column launch; give a pattern with sinks or global tokens). Shapes (1, H, n, D) as a model's
    contiguous heads."""
    h, h_kv = heads
    q, do = (torch.zeros(1, h, n, head_dim, dtype=dtype) for _ in range(2))
    k, v = (torch.zeros(1, h_kv, n, head_dim, dtype=dtype) for _ in range(2))
    bm, bn, warps, stages = config
    prep = Prepared(q, k, v, pattern, head_dim**-0.5, (bm, bn), variant, tma, for_target=True)
    if kind == "fwd":
        launches = forward_plan(q, k, v, prep)[2]
    else:
        out, lse = torch.zeros_like(q), torch.zeros(1, h, n)
        launches = backward_plan(do, q, k, v, out, lse, prep)[2]
    mine = [x for x in launches if x.kind == kind]
    launch = mine[0] if part == "band" else mine[1]
    kwargs = {**launch.kwargs, "BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
    return launch, kwargs


def specialize(kind: str, capability: int, dtype: torch.dtype, head_dim: int, config: tuple, **plan):
    """What a launch on a GPU of this capability would compile: (kernel, target, signature,
    constexprs, attrs, options), from Triton's own launch-time specialisation."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    if INTERPRETER:
        raise RuntimeError("compiling for a GPU needs the compiled mode: import without TRITON_INTERPRET=1")
    launch, kwargs = plan_launch(kind, dtype, head_dim, config, **plan)
    kernel = KERNELS[kind][0]
    set_descriptor_blocks(kind, {**dict(zip(kernel.arg_names, launch.args)), **kwargs})
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return kernel, target, signature, constexprs, attrs, options


def compile_launch(kind: str, capability: int, dtype: torch.dtype, head_dim: int, config: tuple, **plan) -> dict:
    """Compile one launch for compute capability ``capability`` (e.g. 90) and report it:
    registers, spill bytes (stores + loads), shared memory bytes, count of wgmma and mma.sync."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    kernel, target, signature, constexprs, attrs, options = specialize(kind, capability, dtype, head_dim, config,
                                                                       **plan)
    log = io.StringIO()
    saved = knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log
    try:  # compile afresh (a cached kernel has no ptxas log) and print ptxas's log
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = True, True
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
    finally:
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = saved
    found = _PTXAS.search(log.getvalue())
    if found is None:
        raise RuntimeError(f"no ptxas report in the compile log: {log.getvalue()[-500:]!r}")
    ptx = compiled.asm["ptx"]
    return dict(registers=int(found.group(3)), spills=int(found.group(1)) + int(found.group(2)),
                smem=int(compiled.metadata.shared), wgmma=ptx.count("wgmma.mma_async"),
                mma_sync=ptx.count("mma.sync"))


def report_row(job: tuple) -> dict:
    """:func:`compile_launch` of ``job = (kind, capability, dtype name, head dim, config[,
    variant[, tma]])``, with what was compiled, ready for a table. By default the current
    variant, with TMA descriptors where the architecture has them (sm_90, 16-bit)."""
    kind, cap, dtype, head_dim, config, *options = job
    variant = options[0] if options else "current"
    tma = options[1] if len(options) > 1 else (cap >= 90 and dtype != "float32" and variant == "current")
    row = dict(kernel=kind, arch=f"sm_{cap}", dtype=dtype, head_dim=head_dim, config=list(config),
               variant=variant, tma=tma)
    row.update(compile_launch(kind, cap, getattr(torch, dtype), head_dim, config, variant=variant, tma=tma))
    return row


def autotuner_jobs(caps=(80, 90), dtypes=("bfloat16", "float16"), dims=(64, 128)) -> list:
    """Every configuration the autotuner of each architecture may pick, per kernel, dtype and
    head dim (its list, pruned by shared memory and head dim)."""
    return [(kind, cap, dtype, d, cfg) for cap in caps for dtype in dtypes for d in dims for kind in KINDS
            for cfg in fitting(kind, cap, d, getattr(torch, dtype).itemsize)]


def pick_jobs(caps=(75, 80, 89, 90), dtypes=("float16", "bfloat16", "float32"), head_dim: int = 128) -> list:
    """The configuration each architecture's autotuner tries first, per kernel and dtype."""
    jobs = []
    for cap in caps:
        for dtype in dtypes:
            for kind in KINDS:
                configs = fitting(kind, cap, head_dim, getattr(torch, dtype).itemsize)
                if configs:
                    jobs.append((kind, cap, dtype, head_dim, configs[0]))
    return jobs


def design_jobs() -> list:
    """The design choices side by side (bf16, D = 128): the previous kernel (three loops per
    band, untransposed dk/dv, pointer loads), the current one with pointer loads, and with TMA
    (sm_90), each at the configuration the issue measured and at the list's first."""
    jobs = []
    for cap, configs in ((90, {"fwd": [(128, 64, 8, 3)], "dq": [(128, 64, 8, 2)],
                               "dkdv": [(64, 128, 8, 2), (32, 128, 8, 2)]}),
                         (80, {"fwd": [(64, 64, 8, 3)], "dq": [(64, 64, 8, 2)], "dkdv": [(128, 32, 8, 2)]})):
        for kind in KINDS:
            for cfg in configs[kind]:
                options = [("previous", False), ("current", False)] + ([("current", True)] if cap >= 90 else [])
                jobs += [(kind, cap, "bfloat16", 128, cfg, *o) for o in options]
    return jobs


def compile_all(jobs: list, workers: int = 2) -> list:
    """:func:`report_row` of every job, ``workers`` processes at a time (ptxas is single-threaded)."""
    if workers <= 1:
        return [report_row(job) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: a forked child of a process that has compiled (threads, locks) can hang
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(report_row, jobs))


def main(argv=None) -> int:
    """Print the rows of :func:`autotuner_jobs`, :func:`pick_jobs` and :func:`design_jobs`."""
    for row in compile_all(autotuner_jobs() + pick_jobs() + design_jobs()):
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
