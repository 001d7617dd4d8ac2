"""swa_lib as an attention implementation for Hugging Face ``transformers`` models.

After :func:`register`, any model whose attention goes through transformers' attention
interface (Mistral, Qwen2, Gemma 2 and 3, Llama and most recent decoders) runs every attention
layer through :func:`swa_lib.sliding_window_attention`::

    from swa_lib.integrations import transformers as swa_hf

    swa_hf.register()                      # once per process; backend="auto" by default
    model = AutoModelForCausalLM.from_config(config, attn_implementation="swa_lib")
    # or, for a model already built: model.set_attn_implementation("swa_lib")

Windows. A layer that transformers calls with ``sliding_window=W`` gets swa_lib's
``from_hf(W) = (W - 1, 0)``; a layer called with ``sliding_window=None`` gets the causal
window ``(UNBOUNDED, 0)``. A model that does not pass ``sliding_window`` at all gets its layer's
window as transformers picks the layer's mask: the module's ``sliding_window`` attribute, else
``config.sliding_window`` for a ``"sliding_attention"`` entry of ``config.layer_types`` (or for
every layer when there are no layer types). Keys from a cache are the last positions
(transformers' dynamic caches, sliding ones included, hand attention the cached keys followed
by the new ones), so swa_lib's bottom-right alignment of fewer queries than keys is the one
transformers means.

Masks. transformers builds one mask per layer type and hands it to the attention function.
The mask builder registered here (:func:`swa_lib_mask`) returns ``None`` when the mask is
exactly the window swa_lib computes unaided: no padding in the keys' range, the queries the
last keys, no overlay, and transformers' mask function equal to the window on every (query,
key) pair (checked in blocks of query rows, so this costs no ``N x N`` memory). Otherwise it
returns transformers' own boolean mask ``(B, 1, N_q, N_k)``, as transformers' SDPA path does,
and :func:`swa_lib_attention` splits it per batch row into one span of valid queries and keys
(left padding in ``generate``, right padding in batches, the unused slots of a static cache),
checks that the mask inside the span is exactly the layer's window, and calls swa_lib on that
span, once per distinct span. A mask of any other shape (packed documents, chunked attention,
image-token overlays, bidirectional encoders) raises NotImplementedError: results are exact or
refused. Packed training batches can use :func:`swa_lib.varlen_sliding_window_attention`.

Outputs at padded query positions are zeros (transformers' eager attention gives an average
over all keys there); no valid position ever attends to them.

Limits: causal attention only; no logit soft-capping (Gemma 2's default: set the config's
``attn_logit_softcapping`` to None), no dropout while training, no learned attention sinks
(``s_aux``); attention weights are never returned. Under ``torch.compile`` the mask checks
read tensor values, so the model compiles with graph breaks there (not ``fullgraph=True``).
Needs a transformers 5 release with the ``q_offset`` mask API (5.23 is tested; :func:`register`
checks); transformers is imported only inside :func:`register` and the mask builder.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ..attention import sliding_window_attention
from ..backends import get_backend
from ..masks import UNBOUNDED, AttentionPattern, from_hf

__all__ = ["register", "swa_lib_attention", "swa_lib_mask", "layer_window", "NAME"]

#: The name to pass as ``attn_implementation``.
NAME = "swa_lib"

#: Query rows per block when a mask is compared with the window (no N x N temporaries).
CHECK_ROWS = 256

_UNSET = object()  # "sliding_window not passed", which differs from an explicit None (a full layer)


def register(backend: str = "auto") -> None:
    """Register :data:`NAME` with transformers' ``AttentionInterface`` (the attention function,
    bound to ``backend``) and ``AttentionMaskInterface`` (:func:`swa_lib_mask`).

    Calling it again replaces the registration (another ``backend`` takes effect for models
    already built). ValueError for an unknown backend name; ImportError for a transformers
    whose mask builders are not given query offsets (before 5.x's ``q_offset`` API; 5.23 is
    tested).
    """
    if backend != "auto":
        get_backend(backend)  # TypeError/ValueError naming an unknown backend
    import inspect

    import transformers
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if "q_offset" not in inspect.signature(sdpa_mask).parameters:
        raise ImportError(f"swa_lib's transformers integration needs the mask API with q_offset "
                          f"(transformers 5.23 is tested), found transformers {transformers.__version__}")

    AttentionInterface.register(NAME, functools.partial(swa_lib_attention, backend=backend))
    AttentionMaskInterface.register(NAME, swa_lib_mask)


def layer_window(sliding_window: Optional[int]) -> tuple[int, int]:
    """swa_lib's ``(left, right)`` for a layer transformers calls with ``sliding_window``:
    ``from_hf(W)`` for a sliding layer, causal and unbounded for ``None`` (a full layer)."""
    return (UNBOUNDED, 0) if sliding_window is None else from_hf(sliding_window)


def _module_sliding_window(module) -> Optional[int]:
    """The window of a layer that was called without ``sliding_window``, chosen as transformers
    chooses its mask (see the module docstring)."""
    if hasattr(module, "sliding_window"):
        return module.sliding_window
    config = getattr(module, "config", None)
    window = getattr(config, "sliding_window", None)
    types, index = getattr(config, "layer_types", None), getattr(module, "layer_idx", None)
    if window is not None and types is not None and index is not None:
        return window if types[index] == "sliding_attention" else None
    return window


def swa_lib_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset=0,
    mask_function=None,
    attention_mask: Optional[torch.Tensor] = None,
    local_size: Optional[int] = None,
    use_vmap: bool = False,
    device="cpu",
    **kwargs,
) -> Optional[torch.Tensor]:
    """The mask builder for ``attn_implementation="swa_lib"``, called by transformers'
    ``create_causal_mask`` (``local_size=None``) and ``create_sliding_window_causal_mask``
    (``local_size = sliding_window``) with absolute query and key positions
    ``q_offset + r`` and ``kv_offset + c``.

    Returns ``None`` when the mask is exactly the window :func:`layer_window` gives for
    ``local_size`` with the queries as the last keys (see the module docstring); otherwise
    transformers' boolean mask ``(B, 1, q_length, kv_length)`` (True = attend), for
    :func:`swa_lib_attention` to split.
    """
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

    mask_function = causal_mask_function if mask_function is None else mask_function
    q_offset, kv_offset = int(q_offset), int(kv_offset)  # a static cache passes a tensor
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)  # (B, >= kv_offset + kv_length)
    no_padding = padding is None or bool(padding[:, kv_offset:kv_offset + kv_length].all())
    aligned = q_offset + q_length == kv_offset + kv_length and q_length <= kv_length  # queries: the last keys
    if no_padding and aligned and not use_vmap and _is_window(
            mask_function, batch_size, q_length, kv_length, q_offset, kv_offset, layer_window(local_size), device):
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     allow_is_causal_skip=False, allow_is_bidirectional_skip=False, use_vmap=use_vmap,
                     device=device)


def _is_window(mask_function, batch_size, q_length, kv_length, q_offset, kv_offset, window, device) -> bool:
    """Whether transformers' index-based ``mask_function`` allows exactly ``window`` on the
    ``(q_length, kv_length)`` grid, the queries being the last keys."""
    batch = torch.arange(batch_size, device=device)[:, None, None, None]  # (B, 1, 1, 1)
    head = torch.zeros(1, dtype=torch.long, device=device)[None, :, None, None]  # (1, 1, 1, 1)
    keys = (torch.arange(kv_length, device=device) + kv_offset)[None, None, None, :]  # (1, 1, 1, N_k)

    def rows(start, stop):  # broadcasts to (B or 1, 1, n, N_k)
        q = (torch.arange(start, stop, device=device) + q_offset)[None, None, :, None]  # (1, 1, n, 1)
        return torch.as_tensor(mask_function(batch, head, q, keys), device=device)

    return _equals_window(rows, q_length, kv_length, window)


def _equals_window(rows, n_q: int, n_k: int, window) -> bool:
    """Whether a boolean ``(..., n_q, n_k)`` mask, read ``rows(start, stop)`` (its query rows
    ``start..stop``) :data:`CHECK_ROWS` rows at a time so that no ``n_q x n_k`` tensor is built,
    is exactly the causal ``window`` with the queries as the last keys."""
    pattern = AttentionPattern(*window)
    for start in range(0, n_q, CHECK_ROWS):
        stop = min(start + CHECK_ROWS, n_q)
        got = rows(start, stop)
        # rows start..stop of the (n_q, n_k) window: the same rows as the last ones of a grid
        # whose keys end at the last of them, with no key after them visible (causal)
        n = n_k - (n_q - stop)
        expected = pattern.mask(stop - start, n, device=got.device)  # (1, 1, stop - start, n)
        if not bool((got == torch.nn.functional.pad(expected, (0, n_k - n))).all()):
            return False
    return True


def swa_lib_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    sliding_window=_UNSET,
    softcap: Optional[float] = None,
    backend: str = "auto",
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The attention function for ``attn_implementation="swa_lib"``.

    Args:
        module: the calling attention layer (read for ``is_causal`` and, when the call does not
            pass ``sliding_window``, for the layer's window).
        query: ``(B, H, N_q, D)``; key, value: ``(B, H_kv, N_k, D)`` and ``(B, H_kv, N_k, D_v)``
            with ``H`` a multiple of ``H_kv`` (grouped-query attention, no copies).
        attention_mask: ``None`` or a 4-D mask ``(B or 1, 1, N_q, >= N_k)``, boolean (True =
            attend) or additive (0 or the dtype's minimum), as :func:`swa_lib_mask` or a caller
            builds it.
        scaling: the score scale (default ``D ** -0.5``).
        sliding_window: transformers' ``W`` for a sliding layer, ``None`` for a full one.
        backend: swa_lib's backend (:func:`register` binds it).

    Returns:
        ``(attn_output, None)`` with ``attn_output`` of shape ``(B, N_q, H, D_v)``, the layout
        transformers' attention functions return.

    Raises:
        NotImplementedError naming the value for a soft cap, dropout, attention sinks,
        non-causal attention, or a mask that is not the layer's window plus padding.
    """
    if softcap:
        raise NotImplementedError(f"swa_lib has no attention logit soft-capping, got softcap={softcap}; "
                                  "set the config's attn_logit_softcapping to None or use eager attention")
    if dropout:
        raise NotImplementedError(f"swa_lib has no attention dropout, got dropout={dropout}; "
                                  "set attention_dropout to 0 or call model.eval()")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("swa_lib has no learned attention sinks (s_aux)")
    is_causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
    if is_causal is False:
        raise NotImplementedError("swa_lib's transformers integration supports causal attention only, "
                                  f"got is_causal={is_causal} from {type(module).__name__}")
    if sliding_window is _UNSET:
        sliding_window = _module_sliding_window(module)
    window = layer_window(sliding_window)
    if attention_mask is None:
        out = sliding_window_attention(query, key, value, window, scale=scaling, backend=backend)
    else:
        mask = _boolean_mask(attention_mask, query, key)
        out = _attention_with_mask(query, key, value, mask, window, scaling, backend)
    return out.transpose(1, 2).contiguous(), None  # (B, H, N_q, D_v) -> (B, N_q, H, D_v)


def _boolean_mask(mask, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``mask`` as a boolean ``(B, N_q, N_k)`` tensor (True = attend), or a clear error."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"swa_lib needs a tensor attention mask or None, got {type(mask).__name__}")
    batch, n_q, n_k = query.shape[0], query.shape[2], key.shape[2]
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, batch) or mask.shape[2] != n_q \
            or mask.shape[3] < n_k:
        raise NotImplementedError(f"swa_lib needs a mask of shape ({batch}, 1, {n_q}, >= {n_k}), "
                                  f"got {tuple(mask.shape)}")
    mask = mask[:, 0, :, :n_k]  # (B or 1, N_q, N_k), as eager attention slices it
    if mask.dtype != torch.bool:
        allowed = mask > torch.finfo(mask.dtype).min / 2
        if bool((mask[allowed] != 0).any()):
            raise NotImplementedError("swa_lib cannot add an attention bias: the additive mask holds "
                                      "values other than 0 and the dtype's minimum")
        mask = allowed
    return mask.expand(batch, -1, -1)


def _attention_with_mask(q, k, v, mask: torch.Tensor, window, scale, backend) -> torch.Tensor:
    """Attention for a boolean mask ``(B, N_q, N_k)``: per batch row, swa_lib on the one span
    of queries and keys the mask uses, after checking the mask is the window there.

    A causal mask shows each valid query its own key, the last key it sees: query row ``r`` at
    key position ``c + r`` sees key ``c + r`` last. A padded query does not see its own key, so
    it sees an earlier one last (or none): the valid queries are the rows where
    ``last - r`` is largest. They must be consecutive rows, and their keys start at the first
    key any of them sees. Rows sharing a span run in one call; padded queries get zeros.
    """
    n_q, n_k = mask.shape[1:]
    sees_any = mask.any(-1)  # (B, N_q)
    last = n_k - 1 - mask.flip(-1).to(torch.int8).argmax(-1)  # (B, N_q): the last key seen
    first = mask.to(torch.int8).argmax(-1)  # (B, N_q): the first key seen
    offset = torch.where(sees_any, last - torch.arange(n_q, device=mask.device), -1)  # c, less if padded
    c = offset.max(-1).values  # (B,)
    valid = sees_any & (offset == c[:, None])  # (B, N_q): the valid queries
    ends = n_q - valid.flip(-1).to(torch.int8).argmax(-1)  # (B,): one past the last valid row
    # one read back for every batch row: (count, r0, r1, s, e), the number of valid queries,
    # their rows r0..r1 and keys s..e (the first key they see to one past last[r1 - 1] = c + r1 - 1)
    spans = torch.stack([valid.sum(-1), valid.to(torch.int8).argmax(-1), ends,
                         torch.where(valid, first, n_k).min(-1).values, c + ends], -1).tolist()
    groups: dict = {}
    for b, (count, r0, r1, s, e) in enumerate(spans):
        if count and count != r1 - r0:
            raise NotImplementedError(
                f"batch row {b}: the attention mask's valid queries are not consecutive rows "
                "(padding inside a sequence), which swa_lib does not split")
        if count:
            groups.setdefault((r0, r1, s, e), []).append(b)
    out = q.new_zeros(q.shape[:3] + v.shape[3:])  # (B, H, N_q, D_v)
    for (r0, r1, s, e), batch_rows in groups.items():
        idx = torch.tensor(batch_rows, device=q.device)
        # the span's rows of these batch rows, read a few at a time (indexing with idx copies)
        rows = lambda start, stop: mask[idx, r0 + start : r0 + stop, s:e]  # noqa: E731
        if not _equals_window(rows, r1 - r0, e - s, window):
            raise NotImplementedError(
                f"batch rows {batch_rows}: the attention mask is not the causal window {window} plus padding "
                "(packed documents, or a chunked, bidirectional or overlaid mask), which swa_lib does not compute")
        out[idx, :, r0:r1] = sliding_window_attention(q[idx, :, r0:r1], k[idx, :, s:e], v[idx, :, s:e],
                                                      window, scale=scale, backend=backend)
    return out
