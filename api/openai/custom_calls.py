"""Calls to custom tools held to their grammar.

A Responses ``custom`` tool takes free text in a grammar (Lark, or a regular
expression). Models that write their calls as JSON between markers (Qwen,
Hermes: mlx-lm's ``json_tools``) are offered it as a function with one
string, ``input`` (``api/openai/response_tools.py``), so the text the grammar
describes appears inside a JSON string, escaped. The grammar is therefore
rewritten into the grammar of its escaped form: every string literal is
escaped as JSON escapes it, and every regular expression is rebuilt from its
parse so that each character it matches is matched as JSON writes it (a
quote as ``\\"``, a newline as ``\\n``, a control character as ``\\u00XX``).
The rewritten grammar runs as a grammar of its own (llguidance's ``@name``),
so its names and ``%ignore`` stay its own.

The whole answer is then constrained the way llguidance's documentation
shows for tool calls: any text, until the call marker; then a call, either
to a function (its JSON schema) or to a custom tool (its name, then its
input in the rewritten grammar); then any text again. ``call_grammar``
returns the runner's grammar for that, or None where nothing needs it.

What cannot be rewritten is refused with a 400 that names the tool: Lark's
``%import`` and ``%declare`` (definitions from elsewhere), case-insensitive
literals, and regular expressions with anchors, look-arounds or
back-references. ``\\d``, ``\\s`` and ``\\w`` are taken in their ASCII
meaning.
"""

from __future__ import annotations

import ast
import functools
import json
import re
import re._constants as sre
import re._parser as sre_parse
from typing import Any

from api.texts import Markers
from scheduler.errors import InvalidRequest

MAX_CODE = 0x10FFFF
SURROGATES = (0xD800, 0xDFFF)
Ranges = list[tuple[int, int]]

# Lark's own tokens that hold text: comments, string literals (with flags), regexes.
_LARK = re.compile(
    r'(?P<comment>//[^\n]*)|(?P<string>"(?:\\.|[^"\\\n])*"(?P<sflags>[a-z]*))'
    r"|(?P<regex>/(?!/)(?:\\.|[^/\\\n])+/(?P<rflags>[imsx]*))"
    r"|(?P<directive>%[a-z]+)",
)
_REFUSED = {"%import", "%declare", "%llguidance", "%json"}


def call_grammar(
    markers: Markers,
    functions: tuple[dict[str, Any], ...],
    custom: tuple[tuple[str, dict[str, Any]], ...],
) -> dict[str, Any] | None:
    """The runner's grammar that holds custom tools' calls to their grammars
    (None if the model's format is not one mlxd can constrain, or no custom
    tool has a grammar)."""
    if not custom or markers.tool is None or markers.tool_format != "json_tools":
        return None
    start, end = markers.tool
    grammars = []
    calls = []
    for i, (name, fmt) in enumerate(custom):
        try:
            escaped = escaped_grammar(fmt["syntax"], fmt["definition"])
        except ValueError as e:
            raise InvalidRequest(
                f"the grammar of custom tool {name!r} cannot be used: {e}", param="tools"
            ) from None
        grammars.append({"name": f"input{i}", "lark_grammar": escaped})
        head = json.dumps({"name": name, "arguments": {"input": ""}})[:-3]  # up to the open quote
        calls.append(f"{json.dumps(head)} @input{i} {json.dumps(chr(34) + '}}')}")
    guidance = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    custom_names = {name for name, _ in custom}
    for fn in (t["function"] for t in functions):
        if fn["name"] not in custom_names:
            head = json.dumps({"name": fn["name"], "arguments": 0})[:-2]  # up to the arguments
            schema = {**fn["parameters"], "x-guidance": guidance}
            calls.append(f"{json.dumps(head)} %json {json.dumps(schema)} {json.dumps('}')}")
    main = "\n".join(
        [
            "start: call* TEXT",
            "TEXT: /(?s:.*)/",
            f"head[lazy]: TEXT {json.dumps(start + chr(10))}",
            f"call: head body {json.dumps(chr(10) + end)}",
            "body: " + " | ".join(calls),
        ]
    )
    return {"type": "grammars", "grammars": [{"lark_grammar": main}, *grammars]}


@functools.lru_cache(maxsize=64)  # an agent sends its tools every turn
def escaped_grammar(syntax: str, definition: str) -> str:
    """A Lark grammar for the JSON-escaped text of ``definition`` (a Lark
    grammar, or a regular expression); ``ValueError`` where it cannot be."""
    if syntax == "regex":
        return f"start: /{_slashed(escaped_regex(definition, 0))}/"
    out, at = [], 0
    for m in _LARK.finditer(definition):
        out.append(definition[at : m.start()])
        at = m.end()
        if m["comment"]:
            continue
        if m["directive"]:
            if m["directive"] in _REFUSED:
                raise ValueError(f"{m['directive']} is not supported in a custom tool's grammar")
            out.append(m["directive"])
        elif m["string"]:
            if m["sflags"]:
                raise ValueError("case-insensitive literals are not supported")
            value = ast.literal_eval(m["string"].removesuffix(m["sflags"]))
            out.append(json.dumps(json.dumps(value, ensure_ascii=False)[1:-1], ensure_ascii=False))
        else:
            body = m["regex"][1 : -1 - len(m["rflags"])]
            flags = re.DOTALL if "s" in m["rflags"] else 0
            if "i" in m["rflags"]:
                raise ValueError("case-insensitive regular expressions are not supported")
            out.append(f"/{_slashed(escaped_regex(body.replace(chr(92) + '/', '/'), flags))}/")
    out.append(definition[at:])
    return "".join(out)


def escaped_regex(pattern: str, flags: int = 0) -> str:
    """A regular expression (in llguidance's dialect) for the JSON-escaped
    form of what ``pattern`` (Python's dialect) matches."""
    try:
        parsed = sre_parse.parse(pattern, flags)
    except re.error as e:
        raise ValueError(f"invalid regular expression: {e}") from None
    if parsed.state.flags & re.IGNORECASE:
        raise ValueError("case-insensitive regular expressions are not supported")
    return _sequence(list(parsed), bool(parsed.state.flags & re.DOTALL))


def _sequence(items: list[tuple[Any, Any]], dotall: bool) -> str:
    return "".join(_item(op, arg, dotall) for op, arg in items)


def _item(op: Any, arg: Any, dotall: bool) -> str:
    if op is sre.LITERAL:
        return _set([(arg, arg)])
    if op is sre.NOT_LITERAL:
        return _set(_complement([(arg, arg)]))
    if op is sre.ANY:
        return _set(_everything() if dotall else _complement([(10, 10)]))
    if op is sre.IN:
        return _set(_class(arg))
    if op is sre.BRANCH:
        return "(?:" + "|".join(_sequence(list(b), dotall) for b in arg[1]) + ")"
    if op is sre.SUBPATTERN:
        _, add, remove, sub = arg
        if (add | remove) & re.IGNORECASE:
            raise ValueError("case-insensitive groups are not supported")
        inner = dotall if not (add | remove) & re.DOTALL else bool(add & re.DOTALL)
        return f"(?:{_sequence(list(sub), inner)})"
    if op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
        low, high, sub = arg
        count = f"{{{low},}}" if high is sre.MAXREPEAT else f"{{{low},{high}}}"
        return f"(?:{_sequence(list(sub), dotall)}){count}"
    raise ValueError(f"regular expressions with {str(op).lower()} are not supported")


def _class(items: list[tuple[Any, Any]]) -> Ranges:
    ranges: Ranges = []
    negate = False
    for op, arg in items:
        if op is sre.NEGATE:
            negate = True
        elif op is sre.LITERAL:
            ranges.append((arg, arg))
        elif op is sre.RANGE:
            ranges.append(arg)
        elif op is sre.CATEGORY:
            ranges += _category(arg)
        else:
            raise ValueError(f"character classes with {str(op).lower()} are not supported")
    return _complement(ranges) if negate else _merged(ranges)


_ASCII = {
    "DIGIT": [(48, 57)],
    "SPACE": [(9, 13), (32, 32)],
    "WORD": [(48, 57), (65, 90), (95, 95), (97, 122)],
}


def _category(category: Any) -> Ranges:
    name = str(category).removeprefix("CATEGORY_")
    if name.startswith("NOT_"):
        return _complement(_ASCII[name.removeprefix("NOT_")])
    return list(_ASCII[name])


def _merged(ranges: Ranges) -> Ranges:
    out: Ranges = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _complement(ranges: Ranges) -> Ranges:
    out: Ranges = []
    at = 0
    for lo, hi in _merged(ranges):
        if lo > at:
            out.append((at, lo - 1))
        at = hi + 1
    if at <= MAX_CODE:
        out.append((at, MAX_CODE))
    return out


def _everything() -> Ranges:
    return [(0, MAX_CODE)]


def _set(ranges: Ranges) -> str:
    """A regex for the JSON-escaped form of any one character in ``ranges``."""
    plain: Ranges = []
    escapes: list[str] = []
    for lo, hi in ranges:
        for code in range(lo, min(hi, 0x1F) + 1):  # control characters: escaped
            escapes.append(re.escape(json.dumps(chr(code))[1:-1]))
        lo = max(lo, 0x20)
        for cut in (0x22, 0x5C):  # the quote and the backslash: escaped
            if lo <= cut <= hi:
                escapes.append(re.escape(json.dumps(chr(cut))[1:-1]))
                if lo < cut:
                    plain.append((lo, cut - 1))
                lo = cut + 1
        if lo <= hi:
            plain.append((lo, hi))
    plain = _without_surrogates(plain)
    parts = [f"[{''.join(_span(lo, hi) for lo, hi in plain)}]"] if plain else []
    parts += escapes
    if not parts:
        raise ValueError("a character class that matches nothing")
    return parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")"


def _without_surrogates(ranges: Ranges) -> Ranges:
    out: Ranges = []
    for lo, hi in ranges:
        if hi < SURROGATES[0] or lo > SURROGATES[1]:
            out.append((lo, hi))
            continue
        if lo < SURROGATES[0]:
            out.append((lo, SURROGATES[0] - 1))
        if hi > SURROGATES[1]:
            out.append((SURROGATES[1] + 1, hi))
    return out


def _span(lo: int, hi: int) -> str:
    return _char(lo) if lo == hi else f"{_char(lo)}-{_char(hi)}"


def _char(code: int) -> str:
    """A code point as both Python's and llguidance's (Rust's) regexes read it."""
    return f"\\u{code:04X}" if code <= 0xFFFF else f"\\U{code:08X}"


def _slashed(regex: str) -> str:
    """A regex as it goes between Lark's slashes."""
    return regex.replace("/", "\\/")
