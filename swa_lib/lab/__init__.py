"""The book's laboratory: the experiments the chapters run on top of the library.

Nothing in :mod:`swa_lib` imports this package. It holds the tiny language model and its training
loop (``model``, ``training``), the attention-sink demonstration (``sinks``, ``sinks_run``), the
long-range retrieval task (``long_range``), receptive-field measurement (``receptive_field``),
cost and memory probes (``cost``), the book's figures (``plotting``, which needs matplotlib: the
``lab`` extra), how chapters print checked numbers (``report``), stored benchmark results
(``results``) and the shipped training corpus (``data``).
"""
