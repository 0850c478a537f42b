"""JSON mode (`response_format: {"type": "json_object"}`): the answer is one JSON object, token by token.

At every step a row in JSON mode may only pick a token whose bytes keep its answer a prefix of a JSON text
(RFC 8259) whose value is an object; the row ends ("stop") with the token that closes that object. The check
runs on bytes, so it needs the tokenizer's byte table (a byte-level BPE, GPT-2's and lmforge's default for GPT):
`JSONMachine` reads one byte at a time (a stack of open objects and arrays, and where in a value it is), and
`JSONConstraint` turns a machine state into the set of allowed tokens by walking a trie of the vocabulary's byte
strings from that state (tokens sharing a prefix are checked once for it). Sets are cached per state: a string's
inside, the place after a comma, ... recur all through an answer, so most steps find their set ready; a new state
costs one walk on the scheduler thread (4,096 tokens, a 2-core AMD EPYC: 0.1 ms where few tokens fit, up to
14 ms inside a string, where nearly all do; the trie is built once, 78 ms).

What it guarantees: an answer that ends with "stop" parses with `json.loads` as a dict. It says nothing about
the keys or values (`SchemaMachine`, below, does: structured outputs) and an answer cut by max_tokens ("length")
is a prefix. The answer starts with its "{", and whitespace between tokens is laid out as JSON writers do (one
space, or a line break and indentation: `spaced`), so a small model cannot spend its tokens on blank lines.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

# A state: (open containers, "o" object / "a" array, innermost last; what comes next; the whitespace run: `spaced`)
State = tuple[str, Any, int]
WHITESPACE = frozenset(b" \t\n\r")
MAX_INDENT = 16  # spaces or tabs after a line break (json.dumps: indent=2 eight levels deep)
DIGITS = frozenset(b"0123456789")
HEX = frozenset(b"0123456789abcdefABCDEF")
ESCAPES = frozenset(b'"\\/bfnrt')
LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
NUMBER_ENDS = {"N0", "NI", "NF", "NE"}  # number modes where the number may end
# UTF-8 (RFC 3629): a lead byte -> (continuation bytes, the range of the first of them): no overlong forms, no
# surrogates, nothing past U+10FFFF, as Python's decoder (and so json.loads on bytes) reads it
UTF8_LEADS = {
    **{b: (1, 0x80, 0xBF) for b in range(0xC2, 0xE0)},
    0xE0: (2, 0xA0, 0xBF), **{b: (2, 0x80, 0xBF) for b in (*range(0xE1, 0xED), 0xEE, 0xEF)}, 0xED: (2, 0x80, 0x9F),
    0xF0: (3, 0x90, 0xBF), **{b: (3, 0x80, 0xBF) for b in range(0xF1, 0xF4)}, 0xF4: (3, 0x80, 0x8F),
}  # fmt: skip


def spaced(run: int, byte: int) -> int | None:
    """Whitespace between tokens as JSON writers lay it out: one space, or a line break and its indentation. `run`
    says what came since the last token: 0 nothing, 1 a space, 2 + n a line break and n spaces or tabs (at most
    MAX_INDENT); the run after `byte`, or None where it cannot come (so a model cannot pad an answer with blank
    lines, or forever)."""
    if byte == 0x0A:
        return 2 if run == 0 else None
    if run >= 2:
        return run + 1 if byte in (0x20, 0x09) and run - 2 < MAX_INDENT else None
    return 1 if byte == 0x20 and run == 0 else None


class JSONMachine:
    """A byte-at-a-time reader of a JSON text whose value is an object. `step(state, byte)` gives the next state,
    or None if the byte cannot come next; `complete(state)` says whether the object has been closed.

    Modes (the state's middle part): "T" the start (the "{"), "V" a value, "K1" an object's first key or its end,
    "K" a key, ":" the colon, "A1" an array's first value or its end, "E" after a value (a comma, a closing
    bracket, or at the top the end), "S"/"SK" inside a value/key string (valid UTF-8 only: ("U", n, m, lo, hi)
    while a character's n continuation bytes are due, the next in lo..hi), ("\\\\", m) after a backslash in
    string mode m, ("u", n, m) n hex digits still to come, number modes "N-" "N0" "NI" "N." "NF" "Ne" "Ne+" "NE",
    and ("L", rest) the rest of true/false/null."""

    START: State = ("", "T", 0)

    def complete(self, state: State) -> bool:
        return state[0] == "" and state[1] == "E"

    def step(self, state: State, byte: int) -> State | None:
        stack, mode, ws = state
        if isinstance(mode, tuple):
            return self._inner(stack, mode, byte)
        if mode in ("S", "SK"):
            if byte == 0x22:  # '"': the string ends
                return (stack, ":", 0) if mode == "SK" else (stack, "E", 0)
            if byte == 0x5C:  # '\'
                return (stack, ("\\", mode), 0)
            if byte < 0x80:
                return None if byte < 0x20 else state  # control characters must be escaped
            lead = UTF8_LEADS.get(byte)  # a character of several bytes: its continuation bytes must follow
            return None if lead is None else (stack, ("U", lead[0], mode, lead[1], lead[2]), 0)
        if mode[0] == "N":
            nxt = self._number(mode, byte)
            if nxt is not None:
                return (stack, nxt, 0)
            if mode not in NUMBER_ENDS:
                return None
            return self.step((stack, "E", 0), byte)  # the number ended: the byte belongs to what follows
        if mode == "T":  # the answer starts with its "{" (no whitespace before it)
            return ("o", "K1", 0) if byte == 0x7B else None
        if byte in WHITESPACE:
            run = spaced(ws, byte)
            return None if run is None else (stack, mode, run)
        if mode in ("V", "A1"):
            if mode == "A1" and byte == 0x5D:  # ']': an empty array
                return self._close(stack)
            return self._value(stack, byte)
        if mode in ("K1", "K"):
            if byte == 0x22:
                return (stack, "SK", 0)
            return self._close(stack) if mode == "K1" and byte == 0x7D else None
        if mode == ":":
            return (stack, "V", 0) if byte == 0x3A else None
        if mode == "E":
            if not stack:
                return None  # the object is complete: nothing but whitespace may follow
            top = stack[-1]
            if byte == 0x2C:  # ','
                return (stack, "K" if top == "o" else "V", 0)
            if byte == (0x7D if top == "o" else 0x5D):
                return self._close(stack)
        return None

    def _value(self, stack: str, byte: int) -> State | None:
        """The first byte of a value."""
        if byte == 0x7B:  # '{'
            return (stack + "o", "K1", 0)
        if byte == 0x5B:  # '['
            return (stack + "a", "A1", 0)
        if byte == 0x22:
            return (stack, "S", 0)
        if byte == 0x2D:  # '-'
            return (stack, "N-", 0)
        if byte == 0x30:
            return (stack, "N0", 0)
        if byte in DIGITS:
            return (stack, "NI", 0)
        if byte in LITERALS:
            return (stack, ("L", LITERALS[byte]), 0)
        return None

    @staticmethod
    def _close(stack: str) -> State:
        return (stack[:-1], "E", 0)

    @staticmethod
    def _number(mode: str, byte: int) -> str | None:
        """The next number mode, or None if the byte does not continue the number."""
        digit = byte in DIGITS
        if mode == "N-":
            return ("N0" if byte == 0x30 else "NI") if digit else None
        if mode in ("N0", "NI"):
            if digit:
                return "NI" if mode == "NI" else None  # no digits after a leading zero
            return "N." if byte == 0x2E else "Ne" if byte in (0x65, 0x45) else None
        if mode == "N.":
            return "NF" if digit else None
        if mode == "NF":
            return "NF" if digit else "Ne" if byte in (0x65, 0x45) else None
        if mode == "Ne":
            return "NE" if digit else "Ne+" if byte in (0x2B, 0x2D) else None
        if mode in ("Ne+", "NE"):
            return "NE" if digit else None
        return None

    @staticmethod
    def _inner(stack: str, mode: tuple, byte: int) -> State | None:
        """A character's continuation bytes, escapes, \\u digits and the rest of a literal."""
        if mode[0] == "U":  # ("U", bytes still to come, the string's mode, the next byte's range)
            _, left, string, low, high = mode
            if not low <= byte <= high:
                return None
            return (stack, string if left == 1 else ("U", left - 1, string, 0x80, 0xBF), 0)
        if mode[0] == "\\":
            if byte == 0x75:  # 'u'
                return (stack, ("u", 4, mode[1]), 0)
            return (stack, mode[1], 0) if byte in ESCAPES else None
        if mode[0] == "u":
            if byte not in HEX:
                return None
            left = mode[1] - 1
            return (stack, mode[2] if left == 0 else ("u", left, mode[2]), 0)
        rest = mode[1]  # ("L", rest)
        if byte != rest[0]:
            return None
        return (stack, "E", 0) if len(rest) == 1 else (stack, ("L", rest[1:]), 0)


class _Node:
    __slots__ = ("children", "ids")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.ids: list[int] = []  # the tokens whose bytes end here


class JSONConstraint:
    """The tokens allowed in each `JSONMachine` state, for one tokenizer's byte table (`token_bytes`, one entry per
    id; tokens with no bytes, such as EOS and other special tokens, are never allowed: the answer ends when its
    object closes)."""

    def __init__(self, token_bytes: list[bytes], vocab: int | None = None, cache_size: int = 4096) -> None:
        self.singles = {data[0] for data in token_bytes if len(data) == 1}  # the bytes that are tokens alone
        missing = set(range(0x20, 0x7F)) - self.singles
        if missing:  # then some states could have no token at all (every printable ASCII byte keeps one going)
            shown = "".join(sorted(chr(b) for b in missing))[:20]
            raise ValueError(f"JSON mode needs every printable ASCII character as a token of its own; this "
                             f"tokenizer lacks {len(missing)} (e.g. {shown!r})")  # fmt: skip
        self.machine: JSONMachine | SchemaMachine = JSONMachine()
        self.vocab = max(len(token_bytes), vocab or 0)  # the model's logits may have more rows (padding): never allowed
        self.token_bytes = token_bytes
        self.root = _Node()
        for token, data in enumerate(token_bytes):
            if not data:
                continue
            node = self.root
            for byte in data:
                node = node.children.setdefault(byte, _Node())
            node.ids.append(token)
        self._masks: OrderedDict[State, Tensor] = OrderedDict()
        self._cache_size = cache_size

    def following(self, machine: SchemaMachine) -> JSONConstraint:
        """The same vocabulary (its trie shared) for a schema's machine, with a cache of its own."""
        missing = machine.literal_bytes - self.singles
        if missing:  # a key or an enum value this tokenizer could not always spell
            raise SchemaError(f"the schema's keys and values use bytes this tokenizer has no token of its own for: "
                              f"{bytes(sorted(missing))[:20]!r}")  # fmt: skip
        other = copy.copy(self)
        other.machine, other._masks = machine, OrderedDict()
        return other

    def allowed(self, state: State) -> Tensor:
        """(V,) bool: the tokens that may come next in `state` (cached, least recently used dropped first)."""
        mask = self._masks.get(state)
        if mask is not None:
            self._masks.move_to_end(state)
            return mask
        ids: list[int] = []
        step = self.machine.step
        todo = [(self.root, state)]
        while todo:  # the trie, depth first, each prefix read once from its parent's state
            node, at = todo.pop()
            for byte, child in node.children.items():
                nxt = step(at, byte)
                if nxt is None:
                    continue
                ids.extend(child.ids)
                if child.children:
                    todo.append((child, nxt))
        mask = torch.zeros(self.vocab, dtype=torch.bool)
        mask[ids] = True
        self._masks[state] = mask
        if len(self._masks) > self._cache_size:
            self._masks.popitem(last=False)
        return mask

    def advance(self, state: State, token: int) -> State:
        """The state after `token` (which `allowed(state)` allowed)."""
        for byte in self.token_bytes[token]:
            nxt = self.machine.step(state, byte)
            if nxt is None:
                raise ValueError(f"token {token} does not continue the JSON answer here")
            state = nxt
        return state

    def complete(self, state: State) -> bool:
        return self.machine.complete(state)


# ---------------------------------------------------------------------------------------------- JSON schemas
#: schema keywords that constrain values in ways the schema machine does not follow: a schema using one is refused
UNSUPPORTED_KEYWORDS = (
    "pattern", "format", "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "multipleOf", "minProperties", "maxProperties", "uniqueItems", "contains", "minContains", "maxContains", "not",
    "if", "then", "else", "patternProperties", "prefixItems", "propertyNames", "dependentRequired",
    "dependentSchemas", "unevaluatedProperties", "unevaluatedItems",
)  # fmt: skip
VALUE_STARTS = frozenset(b'{["-0123456789tfn')
NUMBER_STARTS = frozenset(b"-0123456789")
TYPE_STARTS = {"object": b"{", "array": b"[", "string": b'"', "number": NUMBER_STARTS, "integer": NUMBER_STARTS,
               "boolean": b"tf", "null": b"n"}  # fmt: skip


class SchemaError(ValueError):
    """A JSON schema the schema machine cannot follow (the message names the keyword and where it is)."""


class SchemaMachine:
    """A byte-at-a-time reader of a JSON object that follows a JSON schema (`response_format: {"type":
    "json_schema"}`), with the same `START` / `step` / `complete` as `JSONMachine`, so `JSONConstraint` gives its
    tokens.

    The schema is compiled into nodes: "obj" (its properties, every one written, in the schema's order, as OpenAI's
    strict mode asks), "map" (an object without properties: any keys, each value of `additionalProperties`),
    "arr" (items, minItems / maxItems), "str", "num" (integer or not), "lit" (enum, const, booleans, null: their
    compact JSON texts), "union" (anyOf / oneOf / a list of types, told apart by their first byte) and "any" (no
    constraint). Keys and enum strings are written as their characters (UTF-8), not as
    `\\u` escapes; whitespace between tokens as in JSON mode. Strings, numbers and free values are read by a
    `JSONMachine` inside the state; `$ref` to `#`, `#/$defs/...` or `#/definitions/...` may recurse. A state is
    (frames, mode, whitespace run): a frame per open object ("o", node, property), map ("m", node, 0) or array
    ("a", node, values written)."""

    def __init__(self, schema: dict[str, Any]) -> None:
        if not isinstance(schema, dict):
            raise SchemaError("the schema must be a JSON object")
        self.json = JSONMachine()
        self.nodes: list[tuple] = []
        self._root_schema = schema
        self._refs: dict[str, int] = {}
        root = self._compile(schema, "schema")
        if self.nodes[root][0] != "obj":
            raise SchemaError("the schema's root must be an object ({'type': 'object', 'properties': ...})")
        self.START: State = ((), ("V", root), 0)
        self.literal_bytes = {b for node in self.nodes if node[0] in ("lit", "obj") for data in node[1] for b in data}

    # -------------------------------------------------------------------------------------------- compiling
    def _new(self, node: tuple) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def _ref(self, ref: str, where: str) -> int:
        if ref in self._refs:  # compiled, or being compiled (a recursive schema)
            return self._refs[ref]
        target: Any = self._root_schema
        if ref != "#":
            parts = ref.split("/")
            if parts[0] != "#" or len(parts) != 3 or parts[1] not in ("$defs", "definitions"):
                raise SchemaError(f"{where}: $ref {ref!r} is not supported (only '#', '#/$defs/NAME', "
                                  "'#/definitions/NAME')")  # fmt: skip
            target = (self._root_schema.get(parts[1]) or {}).get(parts[2])
            if not isinstance(target, dict):
                raise SchemaError(f"{where}: $ref {ref!r} names no definition")
        self._refs[ref] = index = self._new(("ref",))  # a placeholder, filled below
        self.nodes[index] = self.nodes[self._compile(target, ref)]
        return index

    def _compile(self, schema: Any, where: str) -> int:
        if schema is True or schema == {}:
            return self._new(("any",))
        if not isinstance(schema, dict):
            raise SchemaError(f"{where}: a schema must be an object, not {schema!r}")
        if "$ref" in schema:
            return self._ref(schema["$ref"], where)
        for keyword in UNSUPPORTED_KEYWORDS:
            if keyword in schema:
                raise SchemaError(f"{where}: {keyword!r} is not supported in JSON schemas here; leave it out")
        if "const" in schema or "enum" in schema:
            values = [schema["const"]] if "const" in schema else schema["enum"]
            if not isinstance(values, list) or not values:
                raise SchemaError(f"{where}: 'enum' must be a non-empty list")
            if any(isinstance(v, (dict, list)) for v in values):  # (their whitespace would be free)
                raise SchemaError(f"{where}: enum and const values must be strings, numbers, booleans or null")
            texts = [json.dumps(v, ensure_ascii=False, separators=(",", ":")).encode() for v in values]
            return self._literals(texts)
        for keyword in ("anyOf", "oneOf"):
            if keyword in schema:
                options = schema[keyword]
                if not isinstance(options, list) or not options:
                    raise SchemaError(f"{where}: {keyword!r} must be a non-empty list")
                rest = {k: v for k, v in schema.items() if k != keyword}
                alternatives = [
                    self._compile({**rest, **option} if isinstance(option, dict) else option, f"{where}.{keyword}[{i}]")
                    for i, option in enumerate(options)
                ]
                return self._union(alternatives, where)
        if "allOf" in schema:
            parts = schema["allOf"]
            if not isinstance(parts, list) or len(parts) != 1:
                raise SchemaError(f"{where}: 'allOf' is supported with one schema only")
            rest = {k: v for k, v in schema.items() if k != "allOf"}
            return self._compile({**rest, **parts[0]}, where)
        kind = schema.get("type")
        if kind is None:
            return self._new(("any",))
        if isinstance(kind, list):
            return self._union([self._compile({**schema, "type": k}, f"{where}.type[{k}]") for k in kind], where)
        if kind == "object":
            properties = schema.get("properties") or {}
            if not isinstance(properties, dict):
                raise SchemaError(f"{where}: 'properties' must be an object")
            extra = schema.get("additionalProperties", True)
            if not properties and extra is not False:  # a map: any keys, values of additionalProperties
                index = self._new(("map", -1))
                self.nodes[index] = ("map", self._compile(extra, f"{where}.*"))
                return index
            keys = tuple(json.dumps(k, ensure_ascii=False).encode() for k in properties)
            index = self._new(("obj", keys, ()))
            children = tuple(self._compile(s, f"{where}.{k}") for k, s in properties.items())
            self.nodes[index] = ("obj", keys, children)
            return index
        if kind == "array":
            lo, hi = schema.get("minItems", 0), schema.get("maxItems")
            if not isinstance(lo, int) or (hi is not None and (not isinstance(hi, int) or hi < lo)):
                raise SchemaError(f"{where}: minItems / maxItems must be integers, minItems <= maxItems")
            index = self._new(("arr", -1, lo, hi))
            self.nodes[index] = ("arr", self._compile(schema.get("items", True), f"{where}[]"), lo, hi)
            return index
        if kind == "string":
            return self._new(("str",))
        if kind in ("number", "integer"):
            return self._new(("num", kind == "integer"))
        if kind == "boolean":
            return self._literals([b"true", b"false"])
        if kind == "null":
            return self._literals([b"null"])
        raise SchemaError(f"{where}: unknown type {kind!r}")

    def _literals(self, texts: list[bytes]) -> int:
        prefixes = frozenset(t[:i] for t in texts for i in range(1, len(t) + 1))
        return self._new(("lit", frozenset(texts), prefixes))

    def _starts(self, index: int, where: str) -> frozenset[int]:
        node = self.nodes[index]
        kind = node[0]
        if kind == "ref":
            raise SchemaError(f"{where}: a recursive $ref cannot be one of anyOf's alternatives")
        if kind == "union":
            return frozenset(node[1])
        if kind == "lit":
            return frozenset(t[0] for t in node[1])
        starts = {"obj": b"{", "map": b"{", "arr": b"[", "str": b'"', "num": NUMBER_STARTS, "any": VALUE_STARTS}[kind]
        return frozenset(starts)

    def _union(self, alternatives: list[int], where: str) -> int:
        dispatch: dict[int, int] = {}
        literals: list[bytes] = []
        for index in alternatives:  # literals merge into one node; other alternatives must start differently
            if self.nodes[index][0] == "lit":
                literals += self.nodes[index][1]
        if literals:
            alternatives = [i for i in alternatives if self.nodes[i][0] != "lit"] + [self._literals(literals)]
        for index in alternatives:
            for byte in self._starts(index, where):
                if byte in dispatch and dispatch[byte] != index:
                    raise SchemaError(f"{where}: anyOf's alternatives must start differently (two may start with "
                                      f"{chr(byte)!r}); e.g. a string or null, not two objects")  # fmt: skip
                dispatch[byte] = index
        return self._new(("union", dispatch))

    # -------------------------------------------------------------------------------------------- reading
    def complete(self, state: State) -> bool:
        return state[0] == () and state[1] == ("E",)

    def step(self, state: State, byte: int) -> State | None:
        stack, mode, ws = state
        kind = mode[0]
        if kind == "J":  # a string, number or free value, read by the JSON machine
            _, index, sub = mode
            if sub[0] == "" and sub[1] == "E":  # the value ended: the byte belongs to what follows
                return self.step((stack, ("E",), 0), byte)
            nxt = self.json.step(sub, byte)
            if nxt is not None and not (self.nodes[index][0] == "num" and self.nodes[index][1]
                                        and nxt[1] in ("N.", "Ne")):  # fmt: skip
                return (stack, ("J", index, nxt), 0)
            if sub[0] == "" and sub[1] in NUMBER_ENDS:
                return self.step((stack, ("E",), 0), byte)
            return None
        if kind == "MS":  # a map's key, read by the JSON machine as a string
            if mode[1][1] == "E":  # the key ended: a colon (after whitespace) follows
                return self.step((stack, (":",), 0), byte)
            nxt = self.json.step(mode[1], byte)
            return None if nxt is None else (stack, ("MS", nxt), 0)
        if kind == "L":
            _, index, prefix = mode
            grown = prefix + bytes((byte,))
            if grown in self.nodes[index][2]:
                return (stack, ("L", index, grown), 0)
            return self.step((stack, ("E",), 0), byte) if prefix in self.nodes[index][1] else None
        if kind == "K" and mode[1] > 0:  # inside a key (written exactly as the schema names it)
            frame = stack[-1]
            key = self.nodes[frame[1]][1][frame[2]]
            if key[mode[1]] != byte:
                return None
            return (stack, (":",) if mode[1] + 1 == len(key) else ("K", mode[1] + 1), 0)
        if byte in WHITESPACE:
            run = spaced(ws, byte) if stack else None  # none before the answer's "{" or after its "}"
            return None if run is None else (stack, mode, run)
        if kind == "V":
            return self._value(stack, mode[1], byte)
        if kind == "K":  # a key's opening quote
            return (stack, ("K", 1), 0) if byte == 0x22 else None
        if kind == ":":
            frame = stack[-1]
            node = self.nodes[frame[1]]
            value = node[1] if frame[0] == "m" else node[2][frame[2]]
            return (stack, ("V", value), 0) if byte == 0x3A else None
        if kind in ("M1", "MK"):  # after a map's "{" (its end, or a key), or after a comma (a key)
            if kind == "M1" and byte == 0x7D:
                return (stack[:-1], ("E",), 0)
            return (stack, ("MS", ("", "S", 0)), 0) if byte == 0x22 else None
        if kind == "O1":  # after "{"
            if not self.nodes[stack[-1][1]][1]:
                return (stack[:-1], ("E",), 0) if byte == 0x7D else None
            return self.step((stack, ("K", 0), 0), byte)
        if kind == "A1":  # after "["
            _, index, _ = stack[-1]
            _, item, lo, hi = self.nodes[index]
            if byte == 0x5D:
                return (stack[:-1], ("E",), 0) if lo == 0 else None
            return None if hi == 0 else self._value(stack, item, byte)
        if kind == "E" and stack:  # after a value: the open object, map or array says what may follow
            frame = stack[-1]
            node = self.nodes[frame[1]]
            if frame[0] == "m":
                return (stack, ("MK",), 0) if byte == 0x2C else (stack[:-1], ("E",), 0) if byte == 0x7D else None
            if frame[0] == "o":
                if frame[2] + 1 < len(node[1]):
                    return (stack[:-1] + (("o", frame[1], frame[2] + 1),), ("K", 0), 0) if byte == 0x2C else None
                return (stack[:-1], ("E",), 0) if byte == 0x7D else None
            written, (_, item, lo, hi) = frame[2] + 1, node
            if byte == 0x2C and (hi is None or written < hi):
                return (stack[:-1] + (("a", frame[1], written),), ("V", item), 0)
            if byte == 0x5D and written >= lo:
                return (stack[:-1], ("E",), 0)
        return None

    def _value(self, stack: tuple, index: int, byte: int) -> State | None:
        """The first byte of a value of node `index`."""
        node = self.nodes[index]
        kind = node[0]
        if kind == "union":
            target = node[1].get(byte)
            return None if target is None else self._value(stack, target, byte)
        if kind == "obj":
            return (stack + (("o", index, 0),), ("O1",), 0) if byte == 0x7B else None
        if kind == "map":
            return (stack + (("m", index, 0),), ("M1",), 0) if byte == 0x7B else None
        if kind == "arr":
            return (stack + (("a", index, 0),), ("A1",), 0) if byte == 0x5B else None
        if kind == "lit":
            first = bytes((byte,))
            return (stack, ("L", index, first), 0) if first in node[2] else None
        starts = {"str": b'"', "num": NUMBER_STARTS, "any": VALUE_STARTS}[kind]
        if byte not in starts:
            return None
        sub = self.json.step(("", "V", 0), byte)
        return None if sub is None else (stack, ("J", index, sub), 0)
