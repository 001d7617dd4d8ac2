"""The backend registry: which implementations exist and what each can do (Triton-free).

Every backend is a function ``fn(q, k, v, pattern, scale) -> out`` on validated ``(B, H, N, D)``
tensors, registered with its capabilities. :func:`swa_lib.sliding_window_attention` asks the
registry for a backend by name, or with ``backend="auto"`` for the highest-priority one whose
capabilities cover the call. A backend asked for by name that cannot do the call raises a
``ValueError`` saying why; nothing falls back silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Set as AbstractSet
from typing import Callable, Mapping, Optional

import torch

from ..masks import AttentionPattern, check_int

__all__ = ["Backend", "register_backend", "get_backend", "available_backends", "choose_backend", "BACKENDS"]

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionPattern, float], torch.Tensor]


ALL_DEVICES = frozenset({"cpu", "cuda"})
FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


@dataclass(frozen=True)
class Backend:
    """A registered implementation and what it can run: one row of the capability table.

    Attributes:
        name: the string users pass as ``backend=``.
        fn: ``fn(q, k, v, pattern, scale) -> out``.
        priority: ``"auto"`` prefers higher numbers (faster backends).
        devices: device types it runs on (``"cpu"``, ``"cuda"``).
        dtypes: floating dtypes it accepts; ``device_dtypes`` narrows them on one device type.
        head_dims: the query/key head dims it accepts (None: any).
        same_value_dim: whether ``v`` must have the head dim of ``q`` and ``k``.
        dilation, global_tokens, sinks, gqa, cross_length: pattern features it implements
            (``cross_length``: fewer queries than keys, as in cached decoding).
        autograd: whether gradients flow through it.
        is_available: a check for optional dependencies (Triton's goes through ``devices_now``).
        devices_now: the device types it can run on in this process, found at call time, when
            that is decided by the environment (Triton: CUDA compiled, or CPU in the interpreter);
            none at all makes the backend unavailable.
        auto: whether ``"auto"`` may choose it (the loop oracle never is chosen).
        auto_devices: the device types on which ``"auto"`` may choose it.
        max_auto_len: ``"auto"`` skips it above this many keys (dense paths are O(N^2)).
        device_limits: ``fn(q, k, v) -> reason or None``: what the particular device cannot run
            (the Triton kernel: no configuration fits the GPU's shared memory).
        min_auto_capability: ``"auto"`` skips it on CUDA GPUs older than this compute capability
            (the Triton kernel has no tensor-core dots before sm_80).
        wide_windows: ``"auto"`` prefers it when the window covers at least half of the keys
            (then an O(N^2) fused kernel wastes at most 2x and beats banded code).
    """

    name: str
    fn: AttentionFn
    priority: int
    devices: frozenset = ALL_DEVICES
    dtypes: frozenset = FLOAT_DTYPES
    device_dtypes: Optional[Mapping[str, frozenset]] = None
    head_dims: Optional[frozenset] = None
    same_value_dim: bool = False
    dilation: bool = True
    global_tokens: bool = True
    sinks: bool = True
    gqa: bool = True
    cross_length: bool = True
    autograd: bool = True
    is_available: Callable[[], bool] = lambda: True
    devices_now: Optional[Callable[[], frozenset]] = None
    auto: bool = True
    auto_devices: frozenset = ALL_DEVICES
    max_auto_len: Optional[int] = None
    wide_windows: bool = False
    device_limits: Optional[Callable[..., Optional[str]]] = None
    min_auto_capability: Optional[tuple] = None

    def __post_init__(self):
        """Refuse malformed fields here, with a TypeError/ValueError naming the field, rather than
        let a broken backend into the registry, where it would break every later ``"auto"`` call."""
        if not isinstance(self.name, str):
            raise TypeError(f"Backend name must be a str, got {type(self.name).__name__} {self.name!r}")
        if not self.name or self.name == "auto":
            raise ValueError(f"Backend name must be a non-empty str other than 'auto', got {self.name!r}")
        for field_name in ("fn", "is_available"):
            _check_callable(self, field_name, optional=False)
        for field_name in ("devices_now", "device_limits"):
            _check_callable(self, field_name, optional=True)
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise TypeError(f"Backend priority must be an int, got {type(self.priority).__name__} {self.priority!r}")
        for field_name in ("same_value_dim", "dilation", "global_tokens", "sinks", "gqa", "cross_length", "autograd",
                           "auto", "wide_windows"):
            value = getattr(self, field_name)
            if not isinstance(value, bool):
                raise TypeError(f"Backend {field_name} must be a bool, got {type(value).__name__} {value!r}")
        _check_set(self, "devices", self.devices, str)
        _check_set(self, "auto_devices", self.auto_devices, str)
        _check_set(self, "dtypes", self.dtypes, torch.dtype)
        if self.device_dtypes is not None:
            if not isinstance(self.device_dtypes, Mapping):
                raise TypeError(f"Backend device_dtypes must be None or a mapping from device type to dtypes, "
                                f"got {type(self.device_dtypes).__name__} {self.device_dtypes!r}")
            for device, dtypes in self.device_dtypes.items():
                if not isinstance(device, str):
                    raise TypeError(f"Backend device_dtypes keys must be device types (str), got {device!r}")
                _check_set(self, f"device_dtypes[{device!r}]", dtypes, torch.dtype)
        if self.head_dims is not None:
            _check_set(self, "head_dims", self.head_dims, int)
        if self.max_auto_len is not None:
            check_int("Backend max_auto_len", self.max_auto_len, 0)
        cap = self.min_auto_capability
        if cap is not None and (not isinstance(cap, tuple) or not all(
                isinstance(c, int) and not isinstance(c, bool) for c in cap)):
            raise TypeError(f"Backend min_auto_capability must be None or a tuple of ints such as (8, 0), "
                            f"got {type(cap).__name__} {cap!r}")

    def runs_on(self) -> frozenset:
        """The device types it can run on in this process (empty: not available here)."""
        if not self.is_available():
            return frozenset()
        return self.devices if self.devices_now is None else self.devices & self.devices_now()

    def dtypes_on(self, device_type: str) -> frozenset:
        """The dtypes it accepts on one device type."""
        return (self.device_dtypes or {}).get(device_type, self.dtypes)

    def unsupported(self, q: torch.Tensor, k: torch.Tensor, pattern: AttentionPattern,
                    v: Optional[torch.Tensor] = None) -> Optional[str]:
        """Why this backend cannot run the call, or None if it can."""
        runs_on = self.runs_on()
        if not runs_on:
            return f"backend {self.name!r} is not available here (missing optional dependency or device)"
        device = q.device.type
        if device not in runs_on:
            return f"backend {self.name!r} does not run on device {device!r} in this process (runs on {sorted(runs_on)})"
        if q.dtype not in self.dtypes_on(device):
            names = sorted(str(d).replace("torch.", "") for d in self.dtypes_on(device))
            return f"backend {self.name!r} does not support dtype {q.dtype} on {device!r} (supports {names})"
        if self.head_dims is not None and q.shape[-1] not in self.head_dims:
            return f"backend {self.name!r} supports head dims {sorted(self.head_dims)}, got {q.shape[-1]}"
        if self.same_value_dim and v is not None and v.shape[-1] != q.shape[-1]:
            return f"backend {self.name!r} needs v's head dim ({v.shape[-1]}) to equal q's ({q.shape[-1]})"
        if pattern.max_dilation > 1 and not self.dilation:
            return f"backend {self.name!r} does not support dilation (got dilation={pattern.dilation})"
        if pattern.global_tokens is not None and not self.global_tokens:
            return f"backend {self.name!r} does not support global tokens"
        if pattern.sinks and not self.sinks:
            return f"backend {self.name!r} does not support sinks (got sinks={pattern.sinks})"
        if q.shape[1] != k.shape[1] and not self.gqa:
            return f"backend {self.name!r} does not support grouped-query attention (H={q.shape[1]}, H_kv={k.shape[1]})"
        if q.shape[2] != k.shape[2] and not self.cross_length:
            return f"backend {self.name!r} needs as many queries as keys (N_q={q.shape[2]}, N_k={k.shape[2]})"
        if self.device_limits is not None:
            return self.device_limits(q, k, v)
        return None


def _check_callable(backend: Backend, field_name: str, optional: bool) -> None:
    value = getattr(backend, field_name)
    if not (callable(value) or (optional and value is None)):
        what = "None or a callable" if optional else "callable"
        raise TypeError(f"Backend {field_name} must be {what}, got {type(value).__name__} {value!r}")


def _check_set(backend: Backend, field_name: str, value, kind: type) -> None:
    """A set (or frozenset) whose members are all of type ``kind`` (bool is not an int here)."""
    if not isinstance(value, AbstractSet) or not all(
            isinstance(x, kind) and not isinstance(x, bool) for x in value):
        raise TypeError(f"Backend {field_name} must be a frozenset of {kind.__name__}, "
                        f"got {type(value).__name__} {value!r}")


BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Add (or replace) a backend in the registry."""
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be a swa_lib.backends.Backend, got {type(backend).__name__} {backend!r}")
    BACKENDS[backend.name] = backend
    return backend


def available_backends() -> list[str]:
    """Names of the registered backends that can run on this machine."""
    return [name for name, b in BACKENDS.items() if b.runs_on()]


def get_backend(name: str) -> Backend:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__} {name!r}")
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {['auto', *BACKENDS]}")
    return BACKENDS[name]


def choose_backend(name: str, q: torch.Tensor, k: torch.Tensor, pattern: AttentionPattern,
                   v: Optional[torch.Tensor] = None) -> Backend:
    """Resolve ``name`` (or ``"auto"``) to a backend that can run this call, or raise.

    Pass ``v`` too when it may require grad: a gradient needed by any of q, k, v rules out the
    backends without autograd.
    """
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v))
    if name == "auto":
        n_k = k.shape[2]
        band = min(pattern.left, n_k - 1) + min(pattern.right, n_k - 1) + 1
        wide = band * 2 >= n_k
        candidates = sorted(
            (b for b in BACKENDS.values() if b.auto),
            key=lambda b: (wide and b.wide_windows, b.priority),
            reverse=True,
        )
        reasons = []
        for backend in candidates:
            reason = _not_for_auto(backend, q, k, pattern, v, needs_grad)
            if reason is None:
                return backend
            reasons.append(reason)
        device = q.device.type
        if not any(device in b.runs_on() for b in BACKENDS.values()):
            summary = f"device {device!r} is not supported by any backend"
        else:
            summary = "every backend that 'auto' may choose refuses it"
        raise ValueError(f"no registered backend can run this call: {summary}; " + "; ".join(reasons))
    backend = get_backend(name)
    reason = backend.unsupported(q, k, pattern, v)
    if reason is not None:
        raise ValueError(reason)
    if needs_grad and not backend.autograd:
        raise ValueError(f"backend {name!r} does not support autograd; call it under torch.no_grad()")
    return backend


def _not_for_auto(backend: Backend, q, k, pattern, v, needs_grad: bool) -> Optional[str]:
    """Why ``"auto"`` passes this backend over for the call, or None if it may choose it."""
    reason = backend.unsupported(q, k, pattern, v)
    if reason is not None:
        return reason
    device = q.device.type
    if device not in backend.auto_devices:
        return f"'auto' does not choose backend {backend.name!r} on device {device!r} (pass backend={backend.name!r})"
    if needs_grad and not backend.autograd:
        return f"backend {backend.name!r} does not support autograd"
    if device == "cuda" and backend.min_auto_capability is not None:
        cap = torch.cuda.get_device_capability(q.device)
        if cap < backend.min_auto_capability:
            return (f"'auto' does not choose backend {backend.name!r} on compute capability {cap} (below "
                    f"{backend.min_auto_capability}; pass backend={backend.name!r})")
    if backend.max_auto_len is not None and k.shape[2] > backend.max_auto_len:
        return f"'auto' uses backend {backend.name!r} only up to {backend.max_auto_len} keys (got N_k={k.shape[2]})"
    return None
