"""The `prompt_template` of `format: custom`: checked as a format string when the config is built, and
against the rows before any training, so that a bad template fails with its name and the field at fault
instead of a bare `KeyError` or `ValueError` while scoring."""

from __future__ import annotations

import string
from typing import Any, Iterable, Mapping, Optional


def template_fields(template: str) -> list[str]:
    """The field names of `template`, in order; a ValueError naming the template when it is not a format
    string over named fields (`{instruction}`), as the custom format needs."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise ValueError(f"`prompt_template` {template!r} is not a valid format string ({error}); write a field as "
                         "{name} and a literal brace as {{ or }}.") from None
    names = []
    for _, name, _, conversion in parsed:
        if name is None:
            continue
        if not name or name.isdigit():
            raise ValueError(f"`prompt_template` {template!r} has a positional field {{{name}}}; name the row's field, "
                             "e.g. {question}.")
        if "." in name or "[" in name:
            raise ValueError(f"`prompt_template` {template!r} looks up {{{name}}} inside a field; name a top-level "
                             "field of the rows.")
        if conversion not in (None, "s", "r", "a"):
            raise ValueError(f"`prompt_template` {template!r}: unknown conversion !{conversion} in {{{name}}}.")
        names.append(name)
    try:
        template.format(**{name: "text" for name in names})
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"`prompt_template` {template!r} cannot format text fields: "
                         f"{type(error).__name__}: {error}.") from None
    return names


def check_template_fields(template: Optional[str], response_field: Optional[str],
                          rows: Iterable[Mapping[str, Any]]) -> None:
    """A ValueError naming the template (or `response_field`) and the field when no row of `rows` has a field
    that the custom format reads; rows that lack it only here and there get `missing_field` when scored."""
    if template is None:
        return
    present: set[str] = set()
    for row in rows:
        present.update(row)
    for name in template_fields(template):
        if name not in present:
            raise ValueError(f"`prompt_template` {template!r} reads the field {name!r}, which no row has; the rows' "
                             f"fields: {sorted(present)}.")
    if response_field is not None and response_field not in present:
        raise ValueError(f"`response_field` {response_field!r} is not a field of any row; the rows' fields: "
                         f"{sorted(present)}.")
