"""Bibliography entries labelled the way the chapters cite them.

The chapters cite author-year (``bibtex_reference_style: author_year``): a citation reads
[Beltagy et al., 2020]. pybtex's own styles label the bibliography by number or by an alpha
code such as [BPC20], which a reader cannot match with the citation in the text. The style
registered here, ``swa_author_year``, labels each entry with the author-year text its
citations show and sorts the list by author, year and title.
"""

from __future__ import annotations

import pybtex.plugin
from pybtex.style.formatting.unsrt import Style as UnsrtStyle
from pybtex.style.labels import BaseLabelStyle
from pybtex.style.sorting.author_year_title import SortingStyle as AuthorYearTitleSorting

STYLE_NAME = "swa_author_year"


def _last_name(person) -> str:
    return " ".join(part.render_as("text") for part in person.rich_last_names)


def author_year_label(entry) -> str:
    """One author: ``Dao, 2023``; two: ``Milakov and Gimelshein, 2018``; more: ``Dao et al., 2022``."""
    people = entry.persons.get("author") or entry.persons.get("editor") or []
    names = [_last_name(person) for person in people]
    if not names:
        who = entry.fields.get("title", entry.key)
    elif len(names) == 1:
        who = names[0]
    elif len(names) == 2 and names[1] != "others":
        who = f"{names[0]} and {names[1]}"
    else:
        who = f"{names[0]} et al."
    return f"{who}, {entry.fields.get('year', 'n.d.')}"


class AuthorYearLabelStyle(BaseLabelStyle):
    def format_labels(self, sorted_entries):
        for entry in sorted_entries:
            yield author_year_label(entry)


class AuthorYearTitleSortingStyle(AuthorYearTitleSorting):
    """Sorts a braced corporate author ({Gemma Team}) under G, not after Z."""

    def person_key(self, person):
        return super().person_key(person).replace("{", "").replace("}", "")


class AuthorYearStyle(UnsrtStyle):
    default_label_style = AuthorYearLabelStyle
    default_sorting_style = AuthorYearTitleSortingStyle


def setup(app):
    pybtex.plugin.register_plugin("pybtex.style.formatting", STYLE_NAME, AuthorYearStyle, force=True)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
