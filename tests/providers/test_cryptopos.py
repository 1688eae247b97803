"""The Crypto POS signature: pure, no I/O."""

from __future__ import annotations

import hashlib

from service.providers.cryptopos import signature as cryptopos_signature
from service.providers.cryptopos import verify_signature as verify_cryptopos_signature


def test_cryptopos_signature_is_sha256_of_data_then_secret() -> None:
    data = b'{"id": "x", "total": 0.10}'
    assert cryptopos_signature(data, b"s") == hashlib.sha256(data + b"s").hexdigest()
    sig = cryptopos_signature(data, b"s")
    assert verify_cryptopos_signature(data, b"s", sig)
    assert verify_cryptopos_signature(data, b"s", sig.upper())
    assert not verify_cryptopos_signature(data, b"t", sig)
    # The exact bytes count: the same JSON with other spacing is another message.
    assert not verify_cryptopos_signature(b'{"id":"x","total":0.10}', b"s", sig)
    assert not verify_cryptopos_signature(data, b"s", sig[:-1])
    assert not verify_cryptopos_signature(data, b"s", "ü" * 64)
