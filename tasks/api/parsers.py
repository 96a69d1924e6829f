"""JSON in and out that no input can turn into a 500.

- A lone surrogate (``"\\ud800"``) is valid JSON text but not Unicode that UTF-8,
  the database or the renderer can hold: the parser refuses it as 400
  ``invalid`` naming the field (dotted path; for a key, the key itself).
- Nesting deep enough to exhaust Python's recursion is a parse error (400).
- The renderer never fails on such a string either (defence in depth: it falls
  back to ASCII escapes instead of raising).
"""

from __future__ import annotations

from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy
from rest_framework import parsers, renderers
from rest_framework.exceptions import ParseError, ValidationError

MESSAGE = gettext_lazy("contains a lone surrogate code point (not valid Unicode)")


def has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def find_surrogate(data) -> str | None:
    """The dotted path of the first string (value or key) holding a lone surrogate, else None."""
    stack = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if has_surrogate(value):
                return path or "body"
        elif isinstance(value, dict):
            for key, item in value.items():
                name = f"{path}.{key}" if path else str(key)
                if has_surrogate(str(key)):
                    return _printable(name)
                stack.append((name, item))
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}" if path else str(i), item) for i, item in enumerate(value))
    return None


class JSONParser(parsers.JSONParser):
    def parse(self, stream, media_type=None, parser_context=None):
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError(_("JSON parse error - nested too deeply")) from None
        field = find_surrogate(data)
        if field is not None:
            raise ValidationError({field: [MESSAGE]})
        return data


class JSONRenderer(renderers.JSONRenderer):
    def render(self, data, accepted_media_type=None, renderer_context=None):
        try:
            return super().render(data, accepted_media_type, renderer_context)
        except UnicodeEncodeError:
            # Only a lone surrogate gets here; \\uXXXX escapes are valid JSON.
            fallback = renderers.JSONRenderer()
            fallback.ensure_ascii = True
            return fallback.render(data, accepted_media_type, renderer_context)
