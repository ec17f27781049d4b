"""Strict JSON for everything the charger reads from outside (C3, C5).

MicroPython's ``json.loads`` is lenient: it treats ``,`` and ``:`` almost as
whitespace (``{"a": 1 2 3}`` loads as ``{'a': 1, 2: 3}``), accepts trailing
commas, leading zeros and bad escapes, and its ``bytes.decode`` lets overlong
and surrogate UTF-8 through. CPython is strict. So that both runtimes refuse
the same inputs, the text is first checked against the JSON grammar here
(RFC 8259), then handed to ``json.loads``.

Limits: ASCII only (bytes >= 0x80 are refused; the wire contract's payloads
need none), nesting at most 4 deep, and optionally at most ``max_decimals``
digits after the point and no exponent, so that a number like ``5.99999999``
cannot round up to 6.0 in the ESP32's 32-bit floats.

Also refused, although RFC 8259 lets a parser take them (I-JSON, RFC 7493,
does not): a key twice in one object (``{"current_a": 40, "current_a": 0}``
means 0 to one parser and 40 to another), and a ``\\u`` escape of a lone
UTF-16 surrogate (CPython makes a string that cannot be encoded,
MicroPython one that is not UTF-8).
"""
import json

_DIGITS = b"0123456789"
_WS = b" \t\n\r"
_ESCAPES = b'"\\/bfnrt'
_HEX = b"0123456789abcdefABCDEF"
_MAX_DEPTH = 4
# Byte values, so that the checker indexes bytes (O(1) on MicroPython, where
# indexing a str walks its UTF-8 from the start).
_LBRACE, _RBRACE, _LBRACK, _RBRACK = 0x7B, 0x7D, 0x5B, 0x5D
_QUOTE, _BSLASH, _COLON, _COMMA = 0x22, 0x5C, 0x3A, 0x2C
_MINUS, _PLUS, _DOT, _ZERO, _E, _E_UP, _U = 0x2D, 0x2B, 0x2E, 0x30, 0x65, 0x45, 0x75


class _Checker:
    def __init__(self, data, max_decimals):
        self.s = data          # bytes
        self.n = len(data)
        self.i = 0
        self.max_decimals = max_decimals

    def fail(self, what):
        raise ValueError("invalid JSON at %d: %s" % (self.i, what))

    def ws(self):
        s = self.s
        while self.i < self.n and s[self.i] in _WS:
            self.i += 1

    def peek(self):
        return self.s[self.i] if self.i < self.n else -1

    def value(self, depth):
        self.ws()
        c = self.peek()
        if c == _LBRACE:
            self.obj(depth + 1)
        elif c == _LBRACK:
            self.arr(depth + 1)
        elif c == _QUOTE:
            self.string()
        elif c == _MINUS or (c >= 0 and c in _DIGITS):
            self.number()
        else:
            for word in (b"true", b"false", b"null"):
                if self.s[self.i:self.i + len(word)] == word:
                    self.i += len(word)
                    return
            self.fail("unexpected character")

    def obj(self, depth):
        if depth > _MAX_DEPTH:
            self.fail("nested too deep")
        self.i += 1
        self.ws()
        if self.peek() == _RBRACE:
            self.i += 1
            return
        keys = {}
        while True:
            self.ws()
            if self.peek() != _QUOTE:
                self.fail("key must be a string")
            start = self.i
            self.string()
            # bytes, also from a bytearray: MicroPython's bytearray has no
            # "in" and is no dictionary key.
            raw = bytes(self.s[start:self.i])
            # Keys compare as decoded text: "a" and "\u0061" are one key.
            key = json.loads(raw).encode() if _BSLASH in raw else raw[1:-1]
            if key in keys:
                self.i = start
                self.fail("duplicate key")
            keys[key] = True
            self.ws()
            if self.peek() != _COLON:
                self.fail("':' expected")
            self.i += 1
            self.value(depth)
            self.ws()
            c = self.peek()
            self.i += 1
            if c == _RBRACE:
                return
            if c != _COMMA:
                self.fail("',' or '}' expected")

    def arr(self, depth):
        if depth > _MAX_DEPTH:
            self.fail("nested too deep")
        self.i += 1
        self.ws()
        if self.peek() == _RBRACK:
            self.i += 1
            return
        while True:
            self.value(depth)
            self.ws()
            c = self.peek()
            self.i += 1
            if c == _RBRACK:
                return
            if c != _COMMA:
                self.fail("',' or ']' expected")

    def string(self):
        s = self.s
        self.i += 1
        while True:
            if self.i >= self.n:
                self.fail("unterminated string")
            c = s[self.i]
            self.i += 1
            if c == _QUOTE:
                return
            if c < 0x20:
                self.fail("control character in string")
            if c == _BSLASH:
                e = self.peek()
                self.i += 1
                if e == _U:
                    u = self.hex4()
                    if 0xDC00 <= u <= 0xDFFF:
                        self.fail("lone low surrogate")
                    if 0xD800 <= u <= 0xDBFF:
                        if self.s[self.i:self.i + 2] != b"\\u":
                            self.fail("lone high surrogate")
                        self.i += 2
                        if not 0xDC00 <= self.hex4() <= 0xDFFF:
                            self.fail("lone high surrogate")
                elif e < 0 or e not in _ESCAPES:
                    self.fail("bad escape")

    def hex4(self):
        u = 0
        for _ in range(4):
            c = self.peek()
            if c < 0 or c not in _HEX:
                self.fail("bad \\u escape")
            u = u * 16 + int(chr(c), 16)
            self.i += 1
        return u

    def digits(self):
        start = self.i
        while self.i < self.n and self.s[self.i] in _DIGITS:
            self.i += 1
        return self.i - start

    def number(self):
        if self.peek() == _MINUS:
            self.i += 1
        if self.peek() == _ZERO:
            self.i += 1
        elif self.digits() == 0:
            self.fail("digit expected")
        if self.peek() == _DOT:
            self.i += 1
            n = self.digits()
            if n == 0:
                self.fail("digit expected after '.'")
            if self.max_decimals is not None and n > self.max_decimals:
                self.fail("more than %d decimals" % self.max_decimals)
        if self.peek() in (_E, _E_UP):
            if self.max_decimals is not None:
                self.fail("exponent not allowed")
            self.i += 1
            if self.peek() in (_PLUS, _MINUS):
                self.i += 1
            if self.digits() == 0:
                self.fail("digit expected in exponent")


def loads(data, max_decimals=None):
    """Parse ``data`` (bytes or str) as strict JSON and return the value.

    Raises ValueError (with the position) for anything but one JSON value
    with optional surrounding whitespace, for non-ASCII bytes, for nesting
    deeper than 4, and, when ``max_decimals`` is set, for a number with more
    decimals or with an exponent.
    """
    if type(data) is str:
        try:
            data = data.encode()
        except UnicodeError:
            raise ValueError("invalid JSON: not encodable")
    elif type(data) is not bytes and type(data) is not bytearray:
        data = bytes(data)      # (a bytearray is read in place: no copy of a manifest)
    for b in data:
        if b >= 0x80:
            raise ValueError("invalid JSON: non-ASCII byte")
    chk = _Checker(data, max_decimals)
    chk.value(0)
    chk.ws()
    if chk.i != chk.n:
        chk.fail("trailing data")
    # MicroPython's json.loads reads any buffer, a bytearray too; the stubs
    # say str or bytes only.
    return json.loads(data)  # pyright: ignore[reportArgumentType]
