"""Hostile requests: realistic notifications of the three providers, with valid and invalid
authentication, mutated field by field, byte by byte, in framing, headers and paths.

Every case is plain bytes on the wire, drawn from a seeded ``random.Random``, so a campaign is
reproducible from its seed.
"""

from __future__ import annotations

import base64
import copy
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from service.ingest.secrets import mint_secret
from service.providers.cryptopos import signature as cryptopos_signature
from service.settings import SigningKey

# Personal data planted in the bodies: none of it may reach an event.
PII: Final = (
    b"Alice Example",
    b"alice@example.com",
    b"a@example.com",
    b"0x2F67f1426f33E25A920F0b2139cd460fDfb8997C",
)


@dataclass(slots=True)
class Case:
    kind: str
    pieces: list[bytes]
    requests: int = 1
    pause: float = 0.0
    expect_answer: bool = True
    # True when the case is an unmodified valid notification, properly authenticated.
    should_accept: bool = False
    # True when the case is authenticated as a whole (it may be accepted); False: never 200.
    authenticated: bool = False
    secrets: list[str] = field(default_factory=list)  # what must never be echoed back
    deadline: float = 15.0
    head_requests: frozenset[int] = frozenset()


@dataclass(slots=True)
class Keys:
    signing: tuple[SigningKey, ...]
    cryptopos_secret: bytes


class _Raw:
    """A JSON value written as this exact text (numbers JSON's encoder cannot produce)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def dumps(value: Any, rng: random.Random) -> bytes:
    raws: list[str] = []

    def swap(node: Any) -> Any:
        if isinstance(node, _Raw):
            raws.append(node.text)
            return f"@@raw{len(raws) - 1}@@"
        if isinstance(node, dict):
            return {k: swap(v) for k, v in node.items()}
        if isinstance(node, list):
            return [swap(v) for v in node]
        return node

    indent = rng.choice((None, None, None, 2))
    text = json.dumps(swap(value), ensure_ascii=rng.random() < 0.7, indent=indent)
    out = text.encode("utf-8", "surrogatepass")
    for index, raw in enumerate(raws):
        out = out.replace(f'"@@raw{index}@@"'.encode(), raw.encode("utf-8", "surrogatepass"))
    return out


# --- realistic bodies --------------------------------------------------------------------------

_STATUSES_BFX: Final = ("CREATED", "PENDING", "COMPLETED", "EXPIRED")
_STATUSES_CS: Final = ("NEW", "WAITING", "PAID", "EXPIRED", "CANCELLED")


def _ident(rng: random.Random, prefix: str) -> str:
    return f"{prefix}-{rng.getrandbits(40):010x}"


def _amount(rng: random.Random) -> Any:
    digits = rng.randint(0, 8)
    value = f"{rng.randint(0, 5000)}.{rng.randint(0, 10**digits - 1):0{digits}d}"
    value = value.rstrip(".") if digits == 0 else value
    return value if rng.random() < 0.5 else _Raw(value)


def _bfx_time(rng: random.Random) -> str:
    return (
        f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} "
        f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}"
    )


def _iso(rng: random.Random) -> str:
    return (
        f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T"
        f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}.000Z"
    )


def _bfx_payment(rng: random.Random, currency: str) -> dict[str, Any]:
    return {
        "txid": _ident(rng, "tx"),
        "amount": _amount(rng),
        "currency": currency,
        "method": "BITCOIN",
        "status": "COMPLETED",
        "confirmations": rng.randint(0, 12),
        "created_at": _bfx_time(rng),
        "updated_at": _bfx_time(rng),
        "depositId": rng.randint(1, 10**9),
    }


def bitfinex_body(rng: random.Random, order_id: str) -> dict[str, Any]:
    status = rng.choice(_STATUSES_BFX)
    body: dict[str, Any] = {
        "id": _ident(rng, "inv"),
        "type": "ECOMMERCE",
        "orderId": order_id,
        "status": status,
        "amount": _amount(rng),
        "currency": "USD",
        "t": 1_700_000_000_000 + rng.randint(0, 10**10),
        "invoices": [
            {"amount": _amount(rng), "currency": "BTC", "payCurrency": "BTC", "poolCurrency": "BTC"}
        ],
        "customerInfo": {"fullName": "Alice Example", "email": "alice@example.com"},
    }
    if status in ("PENDING", "COMPLETED"):
        body["payment"] = _bfx_payment(rng, "BTC")
        if rng.random() < 0.3:
            body["additionalPayments"] = [_bfx_payment(rng, "BTC")]
            if rng.random() < 0.5:  # as Bitfinex may: ``payment`` repeated among them
                body["additionalPayments"].append(copy.deepcopy(body["payment"]))
    return body


def cryptosteroid_body(rng: random.Random, order_id: str) -> dict[str, Any]:
    return {
        "merchantId": "0f6c2a5e-9d1b-4c1e-8d5a-2b9e5f3c7a11",
        "invoiceId": _ident(rng, "cs"),
        "fiatAmount": _amount(rng),
        "fiatCurrency": "USD",
        "status": rng.choice(_STATUSES_CS),
        "payment": {
            "method": "USDT_TRC20",
            "address": "TXYZ1234",
            "amount": _amount(rng),
            "net": _amount(rng),
            "fee": "0.50",
            "paid": {"hash": [_ident(rng, "h")], "received": _amount(rng), "finished": False},
        },
        "externalId": order_id,
        "createdAt": _iso(rng),
        "updatedAt": _iso(rng),
        "expiresAt": _iso(rng),
    }


def cryptopos_data(rng: random.Random) -> dict[str, Any]:
    return {
        "client": {"name": "Alice", "email": "a@example.com", "referenceID": _ident(rng, "o")},
        "paidAmount": _amount(rng),
        "subTotal": _amount(rng),
        "total": _amount(rng),
        "currency": "USDC",
        "completed": rng.random() < 0.5,
        "transactions": [
            {
                "tx": _ident(rng, "0x"),
                "sender": "0x2F67f1426f33E25A920F0b2139cd460fDfb8997C",
                "amount": _amount(rng),
                "cryptoAmount": _amount(rng),
                "timestamp": _iso(rng),
                "network": "MATIC_POLYGON",
            }
        ],
        "createdAt": _iso(rng),
        "id": _ident(rng, "pos"),
    }


# --- mutations ----------------------------------------------------------------------------------

_DEEP: Final = "[" * 5000 + "]" * 5000

HOSTILE: Final[tuple[Any, ...]] = (
    _Raw(str(2**64)),
    _Raw(str(2**63)),
    _Raw(str(-(2**63) - 1)),
    _Raw("-1"),
    _Raw("-0"),
    _Raw("-0.00"),
    _Raw("0E+5"),
    _Raw("1e2"),
    _Raw("1E-8"),
    _Raw("0.000000010"),
    _Raw("9.99E+79"),
    _Raw("1e999999"),
    _Raw("-1e999999"),
    _Raw("1e-999999"),
    _Raw("1" * 4000),
    _Raw("0." + "0" * 300 + "1"),
    _Raw("1.7976931348623157e308"),
    _Raw("NaN"),
    _Raw("Infinity"),
    _Raw(_DEEP),
    "-0.00",
    "0E+5",
    "1E-8",
    "1e2",
    "9.99E+79",
    "NaN",
    "-Infinity",
    "sNaN",
    "\u0661\u0662\u0663",
    "\uff11\uff12\uff13",
    "1_000",
    " 5 ",
    "0x10",
    "",
    "nul\u0000inv",
    "\ud800",
    "\udfff",
    "a\ud83d",
    "\U0001f642",
    "\u202e",
    "line\nbreak",
    "%0A",
    "../../etc/passwd",
    "x" * 5000,
    "0001-01-01T00:00:00+01:00",
    "9999-12-31T23:59:59-01:00",
    "9999-12-31T23:59:59Z",
    "1969-12-31T23:59:59Z",
    "2999-01-01T00:00:00Z",
    "2021-02-30T00:00:00Z",
    "2021-01-06 21:16:28",
    "yesterday",
    None,
    True,
    False,
    0,
    -1,
    [],
    {},
    [None],
    {"": None},
    [[[[[[[[[[]]]]]]]]]],
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found: list[tuple[Any, ...]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            found.append((*prefix, key))
            found.extend(_paths(value, (*prefix, key)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found.append((*prefix, index))
            found.extend(_paths(value, (*prefix, index)))
    return found


def _parent(root: Any, path: tuple[Any, ...]) -> Any:
    node = root
    for step in path[:-1]:
        node = node[step]
    return node


def mutate_tree(body: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """One to three field-level mutations: a hostile value, a removed or an unknown field."""
    body = copy.deepcopy(body)
    for _ in range(rng.randint(1, 3)):
        paths = _paths(body)
        if not paths:
            break
        path = rng.choice(paths)
        parent = _parent(body, path)
        roll = rng.random()
        if roll < 0.75:
            parent[path[-1]] = copy.deepcopy(rng.choice(HOSTILE))
        elif roll < 0.9 and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[rng.choice(("zz", "\u0000", "a" * 300, "amount"))] = rng.choice(HOSTILE)
    return body


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """A byte-level mutation of a serialized body."""
    roll = rng.randrange(9)
    position = rng.randint(0, len(data))
    if roll == 0:
        return data[:position]  # truncated
    if roll == 1:
        return data[:position] + b"\xff" + data[position:]  # invalid UTF-8
    if roll == 2:
        return data[:position] + rng.choice((b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"))
    if roll == 3 and data:
        flipped = bytearray(data)
        index = rng.randrange(len(flipped))
        flipped[index] ^= 1 << rng.randrange(8)
        return bytes(flipped)
    if roll == 4:
        return b"\xef\xbb\xbf" + data  # a byte order mark
    if roll == 5:
        return data + rng.choice((b"garbage", b"}", b",", b"\x00", b" {}"))
    if roll == 6:
        return b"[" * 100_000 + b"]" * 100_000  # past the size limit, and nesting
    if roll == 7:
        return b'{"a":' * 20_000 + b"1" + b"}" * 20_000
    return rng.choice((b"", b"null", b"[]", b"1", b'"x"', b"{}", b"{", b"\x00" * 10))


# --- requests -----------------------------------------------------------------------------------


def request(
    method: str,
    target: str,
    body: bytes | None,
    headers: list[tuple[str, str]],
    *,
    framing: str = "length",
    rng: random.Random | None = None,
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body is None:
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
        return head
    payload = body
    if framing == "chunked":
        lines.append("Transfer-Encoding: chunked")
        out = bytearray()
        view = body
        chooser = rng or random.Random(0)
        while view:
            size = chooser.randint(1, max(1, len(view)))
            out += f"{size:x}\r\n".encode() + view[:size] + b"\r\n"
            view = view[size:]
        out += b"0\r\n\r\n"
        payload = bytes(out)
    elif framing == "length":
        lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
    return head + payload


class Generator:
    """Draws cases; ``draw()`` picks a family by weight."""

    def __init__(self, keys: Keys, rng: random.Random, max_body: int) -> None:
        self.keys = keys
        self.rng = rng
        self.max_body = max_body
        self.families: list[tuple[float, Callable[[], Case]]] = [
            (30, self.webhook),
            (8, self.framing),
            (8, self.broken_http),
            (5, self.paths_and_methods),
            (4, self.keep_alive),
            (2, self.probes),
        ]
        self._total = sum(weight for weight, _ in self.families)

    def draw(self) -> Case:
        pick = self.rng.random() * self._total
        for weight, family in self.families:
            pick -= weight
            if pick <= 0:
                return family()
        return self.families[-1][1]()

    # -- authentication --

    def token(self, provider: str, order_id: str) -> str:
        return mint_secret(self.keys.signing, provider, order_id)

    def _bad_token(self, provider: str, order_id: str) -> str:
        rng = self.rng
        good = self.token(provider, order_id)
        other_provider = "cryptosteroid" if provider == "bitfinex" else "bitfinex"
        return rng.choice(
            (
                "",
                "k1." + base64.urlsafe_b64encode(rng.randbytes(32)).decode().rstrip("="),
                good + "=",
                good[:-1],
                good.upper(),
                "nokid" + good,
                "zz." + good.partition(".")[2],
                self.token(provider, order_id + "x"),
                self.token(other_provider, order_id),
                good + "\u00e9",
                "x" * 3000,
                ".",
            )
        )

    def webhook(self) -> Case:
        rng = self.rng
        provider = rng.choice(("bitfinex", "cryptosteroid", "cryptopos"))
        order_id = _ident(rng, "order")
        mutated = rng.random() < 0.75
        valid_auth = rng.random() < 0.7
        if provider == "cryptopos":
            return self._cryptopos(mutated, valid_auth)
        builder = bitfinex_body if provider == "bitfinex" else cryptosteroid_body
        tree = builder(rng, order_id)
        byte_level = False
        if mutated:
            if rng.random() < 0.25:
                byte_level = True
            else:
                tree = mutate_tree(tree, rng)
        data = dumps(tree, rng)
        if byte_level:
            data = mutate_bytes(data, rng)
        token = (
            self.token(provider, order_id) if valid_auth else self._bad_token(provider, order_id)
        )
        target = f"/v1/webhooks/{provider}/{order_id}"
        headers = [("Content-Type", "application/json")]
        in_query = provider == "bitfinex" if rng.random() < 0.8 else rng.random() < 0.5
        if token or valid_auth:
            if in_query:
                target += "?token=" + _quote(token)
            else:
                headers.append(("Token", token))
        if rng.random() < 0.1:
            headers[0] = ("Content-Type", rng.choice(_CONTENT_TYPES))
            mutated = True
        framing = "chunked" if rng.random() < 0.1 else "length"
        return Case(
            kind=f"{provider}/{'valid' if valid_auth else 'bad'}-auth/"
            f"{'bytes' if byte_level else 'tree' if mutated else 'clean'}",
            pieces=[request("POST", target, data, headers, framing=framing, rng=rng)],
            should_accept=valid_auth and not mutated and len(data) <= self.max_body,
            authenticated=valid_auth,
            secrets=[token] if valid_auth and token else [],
        )

    def _cryptopos(self, mutated: bool, valid_auth: bool) -> Case:
        rng = self.rng
        tree = cryptopos_data(rng)
        byte_level = mutated and rng.random() < 0.25
        if mutated and not byte_level:
            tree = mutate_tree(tree, rng)
        data = dumps(tree, rng)
        if byte_level:
            data = mutate_bytes(data, rng)
        signature: Any = cryptopos_signature(data, self.keys.cryptopos_secret)
        if not valid_auth:
            signature = rng.choice(
                (
                    "",
                    "0" * 64,
                    signature[:-1],
                    cryptopos_signature(data + b" ", self.keys.cryptopos_secret),
                    _Raw("12"),
                    None,
                    _Raw('"\xff"'),  # invalid UTF-8 inside the signature (issue 9, defect 3)
                    "\ud800",
                )
            )
        elif rng.random() < 0.3:
            signature = signature.upper()
        sig_text = (
            signature.text.encode("latin-1")
            if isinstance(signature, _Raw)
            else json.dumps(signature).encode()
        )
        envelope = b'{"signature": ' + sig_text + b', "data": ' + data + b"}"
        if mutated and rng.random() < 0.2:
            envelope = mutate_bytes(envelope, rng)
        framing = "chunked" if rng.random() < 0.1 else "length"
        return Case(
            kind=f"cryptopos/{'valid' if valid_auth else 'bad'}-auth/"
            f"{'bytes' if byte_level else 'tree' if mutated else 'clean'}",
            pieces=[
                request(
                    "POST",
                    "/v1/webhooks/cryptopos",
                    envelope,
                    [("Content-Type", "application/json")],
                    framing=framing,
                    rng=rng,
                )
            ],
            should_accept=valid_auth and not mutated and len(envelope) <= self.max_body,
            authenticated=valid_auth,
        )

    # -- framing: chunked, oversize, lengths that lie --

    def framing(self) -> Case:
        rng = self.rng
        order_id = _ident(rng, "order")
        valid = rng.random() < 0.5
        token = self.token("bitfinex", order_id) if valid else self._bad_token("bitfinex", order_id)
        target = f"/v1/webhooks/bitfinex/{order_id}?token={_quote(token)}"
        data = dumps(bitfinex_body(rng, order_id), rng)
        json_type = ("Content-Type", "application/json")
        roll = rng.randrange(8)
        kind = "framing/"
        if roll == 0:  # oversize, declared
            big = data + b" " * (self.max_body + rng.randint(1, 200_000))
            pieces = [request("POST", target, big, [json_type])]
            kind += "oversize-length"
        elif roll == 1:  # oversize, chunked
            big = data + b" " * (self.max_body + rng.randint(1, 200_000))
            pieces = [request("POST", target, big, [json_type], framing="chunked", rng=rng)]
            kind += "oversize-chunked"
        elif roll == 2:  # declared huge, nothing sent
            head = request("POST", target, None, [json_type, ("Content-Length", "10000000000")])
            pieces = [head]
            kind += "huge-length"
        elif roll == 3:  # Content-Length and Transfer-Encoding both
            head = request(
                "POST",
                target,
                None,
                [json_type, ("Content-Length", str(len(data))), ("Transfer-Encoding", "chunked")],
            )
            pieces = [head + data]
            kind += "length-and-chunked"
        elif roll == 4:  # a body longer than declared: the rest is the next "request"
            head = request("POST", target, None, [json_type, ("Content-Length", "10")])
            pieces = [head + data]
            return Case(kind + "short-length", pieces, requests=2, secrets=[token])
        elif roll == 5:  # malformed chunk sizes
            head = request("POST", target, None, [json_type, ("Transfer-Encoding", "chunked")])
            pieces = [head + rng.choice((b"zz\r\n", b"-1\r\n", b"ffffffffffffffffff\r\n")) + data]
            kind += "bad-chunk"
        elif roll == 6:  # two Content-Length headers that disagree
            head = request(
                "POST", target, None, [json_type, ("Content-Length", "5"), ("Content-Length", "6")]
            )
            pieces = [head + data]
            kind += "two-lengths"
        else:  # Transfer-Encoding other than chunked
            head = request(
                "POST", target, None, [json_type, ("Transfer-Encoding", "gzip, chunked")]
            )
            pieces = [head + data]
            kind += "other-encoding"
        return Case(kind, pieces, authenticated=False, secrets=[token])

    # -- requests that are not valid HTTP --

    def broken_http(self) -> Case:
        rng = self.rng
        order_id = _ident(rng, "order")
        token = self.token("bitfinex", order_id)
        target = f"/v1/webhooks/bitfinex/{order_id}?token={_quote(token)}"
        body = b"{}"
        post = f"POST {target} HTTP/1.1\r\nHost: x\r\n"
        two = "Content-Length: 2\r\n\r\n{}"
        choices: list[bytes] = [
            f"{post}BadHeader\r\n\r\n".encode(),
            f"{post}Content-Length : 2\r\n\r\n{{}}".encode(),
            f"{post}X: a\x00b\r\n{two}".encode(),
            f"{post}X: \xff\r\n{two}".encode("latin-1"),
            f"{post}X-Long: {'a' * 20000}\r\n\r\n".encode(),
            post.encode() + b"".join(b"X-%d: y\r\n" % i for i in range(500)) + b"\r\n",
            f"{post} folded\r\n{two}".encode(),
            f"POST {target} HTTP/1.1\nHost: x\nContent-Length: 2\n\n{{}}".encode(),
            f"POST {target} HTTP/2.0\r\nHost: x\r\n\r\n".encode(),
            f"POST {target} HTTP/1.1x\r\nHost: x\r\n\r\n".encode(),
            f"POST {target}\r\nHost: x\r\n\r\n".encode(),
            f"post {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
            f"PO ST {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
            f"POST /v1/webhooks/bitfinex/a b?token={_quote(token)} HTTP/1.1\r\n\r\n".encode(),
            f"POST /v1/webhooks/bitfinex/\xe9?token={_quote(token)} HTTP/1.1\r\n\r\n".encode(
                "latin-1"
            ),
            f"POST /{'a' * 20000}?token={_quote(token)} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
            f"POST http://evil.example{target} HTTP/1.1\r\nHost: x\r\n{two}".encode(),
            b"POST * HTTP/1.1\r\nHost: x\r\n\r\n",
            f"GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\n\r\n".encode(),
            f"GET {target} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n{two}".encode(),
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + rng.randbytes(64),  # a TLS hello
            b"\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",  # leading empty lines
            rng.randbytes(rng.randint(1, 300)),
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            f"POST {target} HTTP/1.0\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body,
        ]
        index = rng.randrange(len(choices))
        return Case(f"http/{index}", [choices[index]], secrets=[token])

    # -- paths, methods, probes --

    def paths_and_methods(self) -> Case:
        rng = self.rng
        order_id = _ident(rng, "order")
        token = self.token("bitfinex", order_id)
        method = rng.choice(("GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "POST"))
        target = rng.choice(
            (
                f"/v1/webhooks/bitfinex/{order_id}?token={_quote(token)}",
                f"/v1/webhooks/bitfinex/{order_id}%0A?token={_quote(token)}",
                f"/v1/webhooks/bitfinex/{order_id}%0D%0Ax?token={_quote(token)}",
                f"/v1/webhooks/bitfinex/{order_id}%00?token={_quote(token)}",
                f"/v1/webhooks/bitfinex/%2F..%2F{order_id}?token={_quote(token)}",
                f"/v1/webhooks/bitfinex/{order_id}/?token={_quote(token)}",
                f"/v1/webhooks/bitfinex/{order_id}?token={_quote(token)}&token=x",
                f"/v1/webhooks/bitfinex/{order_id}?token=%ff%fe",
                f"/v1/webhooks/bitfinex/{order_id}#frag",
                "/v1/webhooks/cryptopos/ORDER",
                "/v1/webhooks/bitfinex",
                "/v1/webhooks/nope/x",
                "/v1/webhooks/%0A/x",
                "/v1/webhooks/",
                "//v1//webhooks//bitfinex//x",
                "/v1/webhooks/bitfinex/../../healthz",
                "/%0A",
                "/healthz%0A",
                "/%ff",
                "/\u00e9",
                "/metrics?x=%0A",
                "/" + "%41" * 3000,
                "/nope",
            )
        )
        data = b"{}" if method in ("POST", "PUT", "PATCH") else None
        headers = [("Content-Type", "application/json")] if data is not None else []
        return Case(
            f"path/{method}",
            [request(method, target, data, headers)],
            secrets=[token],
            head_requests=frozenset({0}) if method == "HEAD" else frozenset(),
        )

    def probes(self) -> Case:
        rng = self.rng
        path = rng.choice(("/healthz", "/readyz", "/metrics"))
        method = rng.choice(("GET", "GET", "HEAD", "POST"))
        data = b"{}" if method == "POST" else None
        return Case(
            f"probe/{method}",
            [request(method, path, data, [])],
            head_requests=frozenset({0}) if method == "HEAD" else frozenset(),
        )

    def keep_alive(self) -> Case:
        """Two to four cases' requests on one connection, sent one after another at once."""
        parts = [self.webhook() for _ in range(self.rng.randint(2, 4))]
        return Case(
            "keep-alive",
            [b"".join(p.pieces[0] for p in parts)],
            requests=len(parts),
            secrets=[s for p in parts for s in p.secrets],
            authenticated=any(p.authenticated for p in parts),
        )

    # -- slow clients (run on their own, a few at a time) --

    def slow(self, body_timeout: float) -> Case:
        rng = self.rng
        order_id = _ident(rng, "order")
        valid = rng.random() < 0.5
        token = self.token("bitfinex", order_id) if valid else self._bad_token("bitfinex", order_id)
        target = f"/v1/webhooks/bitfinex/{order_id}?token={_quote(token)}"
        data = dumps(bitfinex_body(rng, order_id), rng)
        json_type = ("Content-Type", "application/json")
        roll = rng.randrange(3)
        if roll == 0:  # announces 60000 bytes, sends 100, then nothing (issue 9, defect 7)
            head = request("POST", target, None, [json_type, ("Content-Length", "60000")])
            return Case(
                f"slow/stalled/{'valid' if valid else 'bad'}-auth",
                [head + b" " * 100],
                # Unauthenticated: answered at once. Authenticated: closed at the deadline.
                expect_answer=not valid,
                deadline=body_timeout + 10,
                secrets=[token],
                authenticated=valid,
            )
        if roll == 1:  # a body that trickles in, finishing well within the deadline
            whole = request("POST", target, data, [json_type])
            step = max(1, len(whole) // 8)
            pieces = [whole[i : i + step] for i in range(0, len(whole), step)]
            return Case(
                f"slow/trickle/{'valid' if valid else 'bad'}-auth",
                pieces,
                pause=body_timeout / (4 * len(pieces)),
                deadline=body_timeout + 10,
                secrets=[token],
                should_accept=valid,
                authenticated=valid,
            )
        # chunked, never finished
        head = request("POST", target, None, [json_type, ("Transfer-Encoding", "chunked")])
        return Case(
            f"slow/unfinished-chunked/{'valid' if valid else 'bad'}-auth",
            [head + b"10\r\n" + data[:16] + b"\r\n"],
            expect_answer=not valid,
            deadline=body_timeout + 10,
            secrets=[token],
            authenticated=valid,
        )


_CONTENT_TYPES: Final = (
    "text/plain",
    "application/x-www-form-urlencoded",
    "application/json; charset=utf-8",
    "application/json;charset=latin-1",
    "APPLICATION/JSON",
    "application/jsonx",
    "",
    "multipart/form-data; boundary=x",
    "application/json\u00e9",
)


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")
