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
the keys or values (that would be `json_schema`, not offered) and an answer cut by max_tokens ("length") is a
prefix. The answer starts with its "{", and whitespace outside strings is limited to 16 bytes in a row, so a model
cannot pad forever between values.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

# A state: (open containers, "o" object / "a" array, innermost last; what comes next; whitespace bytes in a row)
State = tuple[str, Any, int]
WHITESPACE = frozenset(b" \t\n\r")
MAX_WHITESPACE = 16
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
            return None if ws >= MAX_WHITESPACE else (stack, mode, ws + 1)
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
        missing = set(range(0x20, 0x7F)) - {data[0] for data in token_bytes if len(data) == 1}
        if missing:  # then some states could have no token at all (every printable ASCII byte keeps one going)
            shown = "".join(sorted(chr(b) for b in missing))[:20]
            raise ValueError(f"JSON mode needs every printable ASCII character as a token of its own; this "
                             f"tokenizer lacks {len(missing)} (e.g. {shown!r})")  # fmt: skip
        self.machine = JSONMachine()
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
