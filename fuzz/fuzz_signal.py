"""Fuzz target: signaling messages (con_req, con_resp, trim) as a peer could send them.

One input is one message body for ``SignalMessage.parse``.  Passing means:

- nothing but ``MalformedMessage`` ever escapes the parser;
- a body that parses is canonical: ``to_json()`` of it parses back to the same message;
- the GroupVPN controller's security verdict for it (``policy.decide`` of the views the
  controller builds, then ``policy.reconcile`` with its ``encrypt``) never fails, and encrypts
  whenever the message insists on encryption.

The first input byte picks the form of the rest, so the fuzzer gets past the JSON syntax::

    even  the rest, decoded as UTF-8 (bad bytes kept as surrogates), is the body as is
    odd   a well-formed con_req/con_resp/trim whose fields the rest replaces one by one
          (``field index, JSON value`` pairs), so each field's checks see odd values

Run it (libFuzzer options after the script; a corpus directory is optional)::

    .venv/bin/python fuzz/fuzz_signal.py -atheris_runs=100000
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any


def _instrumented() -> contextlib.AbstractContextManager[object]:
    """Coverage instrumentation of ipop's modules when run as a fuzzer; nothing under pytest."""
    if __name__ != "__main__":
        return contextlib.nullcontext()
    import atheris

    return atheris.instrument_imports(include=["ipop"])


with _instrumented():
    from ipop.crypto import policy
    from ipop.errors import MalformedMessage
    from ipop.wire.signal import SignalMessage


TEMPLATE: dict[str, Any] = {
    "v": 1,
    "type": "con_req",
    "uid": "ab" * 20,
    "overlay_id": "lab",
    "ip4": "100.64.0.2",
    "mac": "02:00:00:00:00:02",
    "fingerprint": "sha-256 " + ":".join(["AB"] * 32),
    "security_groups": ["blue", "red"],
    "sec": True,
    "encrypt": True,
    "candidates": ["host 198.19.1.2:5800"],
}
FIELDS = list(TEMPLATE)
# odd values worth trying in any field, besides the JSON text the input spells out
ODD: list[Any] = [None, True, False, 0, 1, -1, 2**64, 1.5, "", "x", [], {}, ["x"], [None],
                  "con_resp", "trim", "sha-256 " + ":".join(["ab"] * 32), "100.64.0.256",
                  "\u0000", "\ud800", "a" * 70, ["g"] * 65]

LOCAL_VIEWS = [
    policy.SecurityView(sec=False, security_groups=frozenset({"blue"})),
    policy.SecurityView(sec=True, security_groups=None),
    policy.SecurityView(sec=False, security_groups=frozenset(), require_encryption=True),
]


def body_of(data: bytes) -> str:
    """The message body an input stands for (see the module docstring)."""
    if not data or not data[0] & 1:
        return data[1:].decode("utf-8", "surrogateescape")
    obj = dict(TEMPLATE)
    obj["type"] = ("con_req", "con_resp", "trim", "con_req")[data[0] >> 1 & 3]
    rest = data[1:]
    while len(rest) >= 2:
        field = FIELDS[rest[0] % len(FIELDS)]
        size = rest[1]
        chunk, rest = rest[2 : 2 + size], rest[2 + size :]
        if size < len(ODD):
            obj[field] = ODD[size]
            continue
        try:
            obj[field] = json.loads(chunk.decode("utf-8", "surrogateescape"))
        except (ValueError, RecursionError):
            obj[field] = chunk.decode("latin-1")
    if rest:
        obj.pop(FIELDS[rest[0] % len(FIELDS)], None)
    return json.dumps(obj, ensure_ascii=bool(data[0] & 0x80))


def check(body: str) -> SignalMessage | None:
    try:
        msg = SignalMessage.parse(body)
    except MalformedMessage:
        return None
    again = SignalMessage.parse(msg.to_json())
    if again != msg:
        raise AssertionError(f"not canonical: {msg!r} -> {again!r}")
    remote = policy.SecurityView(
        sec=True if msg.sec is None else msg.sec,
        security_groups=None if msg.security_groups is None else frozenset(msg.security_groups),
        require_encryption=bool(msg.type == "con_req" and msg.encrypt),
    )
    for local in LOCAL_VIEWS:
        verdict = policy.reconcile(policy.decide(local, remote), msg.encrypt)
        if (remote.require_encryption or local.require_encryption) and not verdict.encrypt:
            raise AssertionError(f"a message that insists on encryption got {verdict}")
    return msg


def TestOneInput(data: bytes) -> None:  # the name atheris and libFuzzer expect
    check(body_of(bytes(data)))


def main() -> None:
    import atheris

    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
