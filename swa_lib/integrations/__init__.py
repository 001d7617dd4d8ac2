"""Bridges from swa_lib to the libraries people already use.

Each submodule imports its peer library only when it is imported itself, so ``import swa_lib``
stays free of them:

- :mod:`swa_lib.integrations.transformers`: an attention implementation for Hugging Face
  ``transformers`` models (``attn_implementation="swa_lib"``);
- :mod:`swa_lib.integrations.flex`: an :class:`~swa_lib.AttentionPattern` as a FlexAttention
  ``mask_mod`` and ``BlockMask``.
"""
