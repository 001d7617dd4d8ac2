"""A small Sphinx extension for the "Using swa_lib" page (book/api.md).

It generates, at build time, the parts of the API guide that must never drift from the code:

``{swa-backend-table}``
    The capability table of every backend in :data:`swa_lib.backends.BACKENDS` (the registry that
    ``sliding_window_attention`` dispatches through), one row per backend.
``{swa-api}``
    autodoc entries for every name in ``swa_lib.__all__`` (the top-level public API).
``{swa-modules}``
    one section per public submodule of swa_lib, with autodoc entries for the names in its
    ``__all__`` that are not already exported at the top level.

So a helper who adds a module, a public function or a backend changes this page without
editing it. Enabled through ``sphinx: local_extensions`` in ``_config.yml``.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


_DTYPE_SHORT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}


def _dtype_names(dtypes) -> str:
    names = [str(d).replace("torch.", "") for d in dtypes]
    order = list(_DTYPE_SHORT)
    return ", ".join(_DTYPE_SHORT.get(n, n) for n in sorted(names, key=lambda n: order.index(n) if n in order else 99))


#: (row label, function of a Backend giving the cell) -- one row per capability.
FEATURES = [
    ("devices", lambda b: ", ".join(sorted(b.devices))),
    ("dtypes", lambda b: "; ".join(f"{d}: {_dtype_names(b.dtypes_on(d))}" for d in sorted(b.devices))
     if b.device_dtypes else _dtype_names(b.dtypes)),
    ("head dims", lambda b: "any" if b.head_dims is None else ", ".join(map(str, sorted(b.head_dims)))),
    ("value head dim", lambda b: "same as q, k" if b.same_value_dim else "any"),
    ("dilation", lambda b: _yes(b.dilation)),
    ("global tokens", lambda b: _yes(b.global_tokens)),
    ("sinks", lambda b: _yes(b.sinks)),
    ("grouped-query heads", lambda b: _yes(b.gqa)),
    ("fewer queries than keys", lambda b: _yes(b.cross_length)),
    ("autograd", lambda b: _yes(b.autograd)),
    ("chosen by ``auto``", lambda b: "no" if not b.auto else (
        ("on " + ", ".join(sorted(b.auto_devices)) + ", " if b.auto_devices != b.devices else "")
        + ("any length" if b.max_auto_len is None else f"up to {b.max_auto_len:,} keys"))),
    ("``auto`` priority", lambda b: str(b.priority)),
    ("available where this page was built", lambda b: _yes(bool(b.runs_on()))),
]


def backend_columns():
    """``(header, rows)`` of the capability table: one column per backend, one row per feature."""
    import swa_lib  # noqa: F401  (registers the built-in backends)
    from swa_lib.backends import BACKENDS

    backends = sorted(BACKENDS.values(), key=lambda b: -b.priority)
    header = ["backend", *(f"``{b.name}``" for b in backends)]
    rows = [[label, *(cell(b) for b in backends)] for label, cell in FEATURES]
    return header, rows


def _list_table(header: list[str], rows: list[list[str]], stub: bool = False) -> list[str]:
    lines = [".. list-table::", "   :header-rows: 1", *(["   :stub-columns: 1"] if stub else []), ""]
    for row in [header, *rows]:
        lines.append(f"   * - {row[0]}")
        lines.extend(f"     - {cell}" for cell in row[1:])
    return lines


class _RstDirective(SphinxDirective):
    """Base: subclasses return reStructuredText lines, parsed in place."""

    has_content = False

    def rst_lines(self) -> list[str]:
        raise NotImplementedError

    def run(self):
        container = nodes.container()
        source = self.get_source_info()[0]
        content = StringList([line for line in self.rst_lines()], source=source)
        nested_parse_with_titles(self.state, content, container)
        return container.children


class BackendTable(_RstDirective):
    def rst_lines(self):
        return _list_table(*backend_columns(), stub=True)


def _top_level_names() -> list[str]:
    import swa_lib

    return list(swa_lib.__all__)


def _auto(kind_obj, qualified: str) -> list[str]:
    if inspect.isclass(kind_obj):
        return [f".. autoclass:: {qualified}", "   :members:", ""]
    if callable(kind_obj):
        return [f".. autofunction:: {qualified}", ""]
    # Data (constants, the registry dict): autodoc would show the docstring of the value's
    # *type* (e.g. dict's), so describe it directly: its type, and its value when short.
    lines = [f".. py:data:: {qualified}", f"   :type: {type(kind_obj).__name__}"]
    if isinstance(kind_obj, (int, float, str)) and len(repr(kind_obj)) < 40:
        lines.append(f"   :value: {kind_obj!r}")
    return [*lines, ""]


_PIPES = re.compile(r"(?<![\\`|])\|(?=[^\s|`])([^|`\n]*?[^\s|`\\])\|(?![`|])")


def escape_pipes(line: str) -> str:
    """Escape ``|word|`` in plain docstring text (the library writes magnitudes as ``|x|``
    outside literals too), which reStructuredText would otherwise read as an undefined
    substitution. Table and line-block lines (starting with ``|`` or ``+``) are left alone."""
    if line.lstrip().startswith(("|", "+")):
        return line
    return _PIPES.sub(lambda m: "\\|" + m.group(1) + "\\|", line)


def _process_docstring(app, what, name, obj, options, lines):
    lines[:] = [escape_pipes(line) for line in lines]


class TopLevelApi(_RstDirective):
    def rst_lines(self):
        import swa_lib

        lines = []
        for name in _top_level_names():
            lines += _auto(getattr(swa_lib, name), f"swa_lib.{name}")
        return lines


#: Packages whose modules are data, not API.
_NOT_API = {"lab.results", "lab.data"}


def public_submodules() -> list[str]:
    """Dotted names (below ``swa_lib``) of its public modules: the library's, then the backends',
    then the lab's, each group sorted. No leading underscores, no data packages."""
    import swa_lib

    names = [m.name.removeprefix("swa_lib.") for m in pkgutil.walk_packages(swa_lib.__path__, "swa_lib.",
                                                                                   onerror=lambda _: None)]
    names = [n for n in names if not any(part.startswith("_") for part in n.split("."))
             and not any(n == p or n.startswith(p + ".") for p in _NOT_API)]
    group = {"backends": 1, "lab": 2}
    return sorted(names, key=lambda n: (group.get(n.split(".")[0], 0), n))


class SubmoduleApi(_RstDirective):
    def rst_lines(self):
        import swa_lib

        seen = {id(getattr(swa_lib, n)) for n in swa_lib.__all__}  # each object documented once
        lines = []
        for mod_name in public_submodules():
            module = importlib.import_module(f"swa_lib.{mod_name}")
            names = [n for n in getattr(module, "__all__", []) if id(getattr(module, n)) not in seen]
            seen |= {id(getattr(module, n)) for n in names}
            title = f"``swa_lib.{mod_name}``"
            lines += [title, "~" * len(title), ""]
            doc = inspect.getdoc(module) or ""
            summary = escape_pipes(doc.split("\n\n", 1)[0].replace("\n", " "))
            if summary:
                lines += [summary, ""]
            if not names:
                lines += ["Everything public here is documented above (it is re-exported there).", ""]
            for name in names:
                lines += _auto(getattr(module, name), f"swa_lib.{mod_name}.{name}")
        return lines


class Coverage(_RstDirective):
    """The map of which chapter covers which topic. Content: one ``NN | topic | library modules`` row per item.

    The chapter column is computed: the document ``book/NN_*`` if the book has one (a link to
    it), otherwise "planned". So the map never claims a chapter that is not in the build.
    """

    has_content = True

    def rst_lines(self):
        docs = sorted(self.env.found_docs)
        rows = []
        for line in self.content:
            if not line.strip():
                continue
            number, topic, modules = (part.strip() for part in line.split("|"))
            found = [d for d in docs if d.startswith(f"book/{int(number):02d}_")]
            chapter = f":doc:`/{found[0]}`" if found else "*planned*"
            rows.append([number, topic, chapter, modules or "--"])
        return _list_table(["item", "topic", "chapter", "library"], rows)


def _dedupe_scripts(app, pagename, templatename, context, doctree):
    """Drop exact duplicate <script> entries from a page.

    sphinx-thebe 0.3.1 registers its inline configuration script (``const THEBE_JS_URL = ...``)
    on ``env-before-read-docs``, which Jupyter Book 1 lets fire twice, so every page declared
    the same ``const`` twice and the browser reported "Uncaught SyntaxError: Identifier
    'THEBE_JS_URL' has already been declared" (found by tests/test_site.py).
    """
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for script in scripts:
        # an inline script is registered once with filename None and once with "" (registry
        # vs builder), so compare the filename's truthiness-normalised value and the attributes
        key = (getattr(script, "filename", str(script)) or "",
               tuple(sorted((k, str(v)) for k, v in getattr(script, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def setup(app):
    app.connect("html-page-context", _dedupe_scripts)
    app.add_directive("swa-coverage", Coverage)
    app.connect("autodoc-process-docstring", _process_docstring)
    app.add_directive("swa-backend-table", BackendTable)
    app.add_directive("swa-api", TopLevelApi)
    app.add_directive("swa-modules", SubmoduleApi)
    return {"version": "0.1", "parallel_read_safe": True, "parallel_write_safe": True}
