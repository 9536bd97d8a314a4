"""The rendering of validation errors: every message names the key (dotted path, list items as
[i]), the bad value and what is allowed, described from the schema node itself, so a new key
gets good messages for free; unknown keys get a "did you mean" or where they belong.

Imported by foldsoup.config.schema at parse time: no torch.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from foldsoup.errors import ConfigError

_TYPE_WORDS = {"number": "a number", "integer": "an integer", "string": "a string", "boolean": "true or false",
               "array": "a list", "object": "a mapping (key: value)", "null": "null"}
_BOUND_OPS = (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"))
_NUMBER_LIKE = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")


def resolve(node: dict, schema: dict) -> dict:
    """A schema node with its `$ref` followed (into the schema's $defs)."""
    ref = node.get("$ref")
    if ref:
        assert ref.startswith("#/$defs/"), ref
        return schema["$defs"][ref.split("/")[-1]]
    return node


def invalid(problems: list[str]) -> ConfigError:
    """One ConfigError listing every problem, one line each."""
    return ConfigError(f"invalid configuration ({len(problems)} problem(s)):\n" + "\n".join(f"  - {p}" for p in problems))


def describe(errors: list, schema: dict) -> list[str]:
    """One line per problem of jsonschema's errors (sorted by key), without repeats."""
    # A value outside an enum also fails the enum's `type`: the enum message says it all.
    enum_paths = {tuple(e.absolute_path) for e in errors if e.validator == "enum"}
    errors = [e for e in errors if not (e.validator == "type" and tuple(e.absolute_path) in enum_paths)]
    # jsonschema reports each missing required key separately, with the same list: dedupe.
    return list(dict.fromkeys(line for e in errors for line in _describe_error(e, schema)))


def _key_path(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "the top level"


# In order: bool before int, since bool is a subclass of int.
_TYPE_NAMES = ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
               (list, "a list"), (dict, "a mapping"))


def type_of(value: Any) -> str:
    """'an integer', 'a list', 'null', ...: what a value is, in words."""
    if value is None:
        return "null"
    return next((name for kind, name in _TYPE_NAMES if isinstance(value, kind)), f"a {type(value).__name__}")


def _allowed(node: dict, schema: dict) -> str:
    """What a schema node accepts, in words: 'a number > 0', "one of 'a', 'b'", ..."""
    node = resolve(node, schema)
    if "enum" in node:
        return "one of " + ", ".join(repr(v) for v in node["enum"])
    types = node.get("type", [])
    types = [types] if isinstance(types, str) else list(types)
    main = [t for t in types if t != "null"]
    text = " or ".join(_TYPE_WORDS.get(t, t) for t in main) or "a value"
    bounds = [f"{op} {node[key]}" for key, op in _BOUND_OPS if key in node]
    if bounds:
        text += " " + " and ".join(bounds)
    if "array" in main:
        parts = []
        if "items" in node:
            parts.append(_items_allowed(node["items"], schema))
        lo, hi = node.get("minItems"), node.get("maxItems")
        if lo is not None and lo == hi:
            parts.append(f"exactly {lo} item(s)")
        else:
            if lo:
                parts.append(f"at least {lo} item(s)")
            if hi is not None:
                parts.append(f"at most {hi} item(s)")
        if node.get("uniqueItems"):
            parts.append("no duplicates")
        head = parts.pop(0) if "items" in node else ""
        text += (" " + head if head else "") + (" (" + ", ".join(parts) + ")" if parts else "")
    if "object" in main and node.get("properties"):
        text += " with keys " + ", ".join(node["properties"])
    if node.get("minLength"):
        text += " (non-empty)"
    if "null" in types:
        text += " or null"
    return text


def _items_allowed(node: dict, schema: dict) -> str:
    """'of numbers > 0', "of values from 'a', 'b'", 'of true/false values'."""
    node = resolve(node, schema)
    if "enum" in node:
        return "of values from " + ", ".join(repr(v) for v in node["enum"])
    if node.get("type") == "boolean":
        return "of true/false values"
    plural = {"number": "numbers", "integer": "integers", "string": "strings", "object": "mappings", "array": "lists"}
    text = "of " + plural.get(node.get("type"), "values")
    bounds = [f"{op} {node[key]}" for key, op in _BOUND_OPS if key in node]
    return text + (" " + " and ".join(bounds) if bounds else "")


def _string_hint(value: Any, node: dict, schema: dict) -> str:
    """Why a number may have arrived as a string, and how to fix it."""
    node = resolve(node, schema)
    types = node.get("type", [])
    types = [types] if isinstance(types, str) else types
    if not (isinstance(value, str) and {"number", "integer"} & set(types) and _NUMBER_LIKE.match(value)):
        return ""
    if re.match(r"^\s*[-+]?\d+[eE]", value):  # YAML 1.1 needs a dot in the mantissa: 1e-3 is a string
        fixed = re.sub(r"^(\s*[-+]?\d+)([eE])", r"\1.0\2", value).strip()
        return f" (YAML reads {value.strip()} as text: write {fixed} or {float(value):g})"
    return (" (write the number without quotes; Snakemake's --config passes values inside {...} or [...] as "
            "strings, so give nested values in a YAML file with --configfile)")


def _all_keys(schema: dict) -> dict[str, list[str]]:
    """Leaf name -> dotted paths of every key the schema knows (for 'did you mean')."""
    found: dict[str, list[str]] = {}

    def walk(node: dict, prefix: str) -> None:
        node = resolve(node, schema)
        for key, sub in node.get("properties", {}).items():
            path = f"{prefix}.{key}" if prefix else key
            found.setdefault(key, []).append(path)
            walk(sub, path)

    walk(schema, "")
    return found


def _suggest(key: str, where: str, allowed: list[str], schema: dict) -> str:
    close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    elsewhere = [p for p in _all_keys(schema).get(str(key), []) if p.rpartition(".")[0] != where]
    if elsewhere:
        return f"; it belongs under {' or '.join(p.rpartition('.')[0] or 'the top level' for p in elsewhere)} ({', '.join(elsewhere)})"
    return ""


def _duplicates(items: list) -> list:
    seen, dups = [], []
    for item in items:
        # JSON equality: 1 == 1.0, but true is not 1.
        key = (isinstance(item, bool), item)
        if key in seen and item not in dups:
            dups.append(item)
        seen.append(key)
    return dups


def _describe_error(err, schema: dict) -> list[str]:
    path = _key_path(err.absolute_path)
    value, node, kind = err.instance, err.schema, err.validator
    if kind == "additionalProperties":
        allowed = list(node.get("properties", {}))
        where = ".".join(str(p) for p in err.absolute_path)
        extra = [k for k in value if k not in allowed]
        return [f"{where + '.' if where else ''}{key}: unknown key{_suggest(key, where, allowed, schema)} "
                f"(allowed {'under ' + where if where else 'at the top level'}: {', '.join(allowed)})" for key in extra]
    if kind == "required":
        missing = [k for k in err.validator_value if k not in value]
        where = ".".join(str(p) for p in err.absolute_path)
        return [f"{where + '.' if where else ''}{key}: missing; it is required "
                f"(allowed: {_allowed(node['properties'][key], schema)})" for key in missing]
    if kind == "type":
        return [f"{path}: {value!r} is {type_of(value)}{_string_hint(value, node, schema)}; allowed: {_allowed(node, schema)}"]
    if kind == "enum":
        close = difflib.get_close_matches(str(value), [str(v) for v in node["enum"]], n=1, cutoff=0.6)
        mean = f"; did you mean {close[0]!r}?" if close else ""
        return [f"{path}: {value!r} is not allowed{mean} (allowed: {_allowed(node, schema)})"]
    if kind in dict(_BOUND_OPS):
        return [f"{path}: {value!r} is out of range; allowed: {_allowed(node, schema)}"]
    if kind == "minItems":
        what = "is empty" if not value else f"has {len(value)} item(s)"
        return [f"{path}: {value!r} {what}; allowed: {_allowed(node, schema)}"]
    if kind == "minLength":
        return [f"{path}: {value!r} is empty; allowed: a non-empty string"]
    if kind == "maxItems":
        return [f"{path}: {value!r} has {len(value)} item(s); allowed: {_allowed(node, schema)}"]
    if kind == "uniqueItems":
        dups = ", ".join(repr(d) for d in _duplicates(value))
        why = " (a repeated grid value would train the same models twice)" if path.startswith("grid.") else ""
        return [f"{path}: {dups} appears more than once in {value!r}; every value may appear only once{why}"]
    return [f"{path}: {err.message}"]
