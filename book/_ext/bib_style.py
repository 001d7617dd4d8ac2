"""The bibliography in the same author-year form as the citations in the text.

sphinxcontrib-bibtex cites author-year in the text (``bibtex_reference_style: author_year``)
but labels the list with its default formatting style, "alpha" ([BPC20]). This style labels
each entry "Beltagy et al., 2020" (one author: "Dao, 2023"; two: "Milakov and Gimelshein,
2018"; "A and others" in the bib file counts as "A et al.") and sorts the list by author, year
and title, so a reader finds an entry where the text says. Titles are printed as the papers
spell them: pybtex's own styles lower-case every unbraced word ("Longformer: the long-document
Transformer"); the braces around names and acronyms in references.bib ({Longformer}, {IO})
still protect them for any BibTeX tool that does.
"""

from pybtex.plugin import register_plugin
from pybtex.style.formatting.unsrt import Style as UnsrtStyle
from pybtex.style.labels import BaseLabelStyle
from pybtex.style.sorting.author_year_title import SortingStyle as AuthorYearTitleSorting
from pybtex.style.template import field, sentence


def _surname(person) -> str:
    return " ".join(person.prelast_names + person.last_names).replace("{", "").replace("}", "")


class AuthorYearLabels(BaseLabelStyle):
    def format_labels(self, sorted_entries):
        for entry in sorted_entries:
            people = list(entry.persons.get("author") or entry.persons.get("editor") or [])
            if people and len(people) > 1 and _surname(people[-1]) == "others":  # "A and others"
                people = people[:-1] + [None, None]
            if not people:
                who = entry.fields.get("organization", entry.key)
            elif len(people) == 1:
                who = _surname(people[0])
            elif len(people) == 2 and people[1] is not None:
                who = f"{_surname(people[0])} and {_surname(people[1])}"
            else:
                who = f"{_surname(people[0])} et al."
            yield f"{who}, {entry.fields.get('year', 'n.d.')}"


class AuthorYearTitleBraceless(AuthorYearTitleSorting):
    """Sorts a braced corporate author ({Gemma Team}) under G, not after Z."""

    def person_key(self, person):
        return super().person_key(person).replace("{", "").replace("}", "")


class AuthorYearStyle(UnsrtStyle):
    default_label_style = "author_year_labels"
    default_sorting_style = AuthorYearTitleBraceless

    def format_title(self, e, which_field, as_sentence=True):
        title = field(which_field)  # as written, not sentence-cased
        return sentence[title] if as_sentence else title


def setup(app):
    register_plugin("pybtex.style.labels", "author_year_labels", AuthorYearLabels)
    register_plugin("pybtex.style.formatting", "author_year", AuthorYearStyle)
    return {"parallel_read_safe": True}
