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
"""
import json

_DIGITS = "0123456789"
_WS = " \t\n\r"
_ESCAPES = '"\\/bfnrt'
_HEX = "0123456789abcdefABCDEF"
_MAX_DEPTH = 4


class _Checker:
    def __init__(self, text, max_decimals):
        self.s = text
        self.i = 0
        self.max_decimals = max_decimals

    def fail(self, what):
        raise ValueError("invalid JSON at %d: %s" % (self.i, what))

    def ws(self):
        s = self.s
        n = len(s)
        while self.i < n and s[self.i] in _WS:
            self.i += 1

    def peek(self):
        return self.s[self.i] if self.i < len(self.s) else ""

    def value(self, depth):
        self.ws()
        c = self.peek()
        if c == "{":
            self.obj(depth + 1)
        elif c == "[":
            self.arr(depth + 1)
        elif c == '"':
            self.string()
        elif c == "-" or (c and c in _DIGITS):
            self.number()
        else:
            for word in ("true", "false", "null"):
                if self.s.startswith(word, self.i):
                    self.i += len(word)
                    return
            self.fail("unexpected %r" % c)

    def obj(self, depth):
        if depth > _MAX_DEPTH:
            self.fail("nested too deep")
        self.i += 1
        self.ws()
        if self.peek() == "}":
            self.i += 1
            return
        while True:
            self.ws()
            if self.peek() != '"':
                self.fail("key must be a string")
            self.string()
            self.ws()
            if self.peek() != ":":
                self.fail("':' expected")
            self.i += 1
            self.value(depth)
            self.ws()
            c = self.peek()
            self.i += 1
            if c == "}":
                return
            if c != ",":
                self.fail("',' or '}' expected")

    def arr(self, depth):
        if depth > _MAX_DEPTH:
            self.fail("nested too deep")
        self.i += 1
        self.ws()
        if self.peek() == "]":
            self.i += 1
            return
        while True:
            self.value(depth)
            self.ws()
            c = self.peek()
            self.i += 1
            if c == "]":
                return
            if c != ",":
                self.fail("',' or ']' expected")

    def string(self):
        s = self.s
        self.i += 1
        while True:
            if self.i >= len(s):
                self.fail("unterminated string")
            c = s[self.i]
            self.i += 1
            if c == '"':
                return
            if c < " ":
                self.fail("control character in string")
            if c == "\\":
                e = self.peek()
                self.i += 1
                if e == "u":
                    for _ in range(4):
                        if self.peek() == "" or self.peek() not in _HEX:
                            self.fail("bad \\u escape")
                        self.i += 1
                elif e == "" or e not in _ESCAPES:
                    self.fail("bad escape")

    def digits(self):
        start = self.i
        while self.peek() != "" and self.peek() in _DIGITS:
            self.i += 1
        return self.i - start

    def number(self):
        if self.peek() == "-":
            self.i += 1
        if self.peek() == "0":
            self.i += 1
        elif self.digits() == 0:
            self.fail("digit expected")
        if self.peek() == ".":
            self.i += 1
            n = self.digits()
            if n == 0:
                self.fail("digit expected after '.'")
            if self.max_decimals is not None and n > self.max_decimals:
                self.fail("more than %d decimals" % self.max_decimals)
        if self.peek() in ("e", "E") and self.peek() != "":
            if self.max_decimals is not None:
                self.fail("exponent not allowed")
            self.i += 1
            if self.peek() in ("+", "-") and self.peek() != "":
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
    if type(data) is not str:
        for b in data:
            if b >= 0x80:
                raise ValueError("invalid JSON: non-ASCII byte")
        data = data.decode()
    else:
        for c in data:
            if ord(c) >= 0x80:
                raise ValueError("invalid JSON: non-ASCII character")
    chk = _Checker(data, max_decimals)
    chk.value(0)
    chk.ws()
    if chk.i != len(data):
        chk.fail("trailing data")
    return json.loads(data)
