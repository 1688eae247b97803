"""What each provider POSTs to us, as it sends it.

Structs ignore unknown fields (providers add fields without notice) and declare only what
payhook uses or must validate. Customer personal data (Bitfinex ``customerInfo``, Crypto POS
``client.name``/``email``/``phone``, a transaction's ``sender`` wallet) is deliberately not
declared, so the decoder drops it before anything else can see it.

Amounts are kept as the raw JSON text the provider sent (:data:`Amount`), a number or a
string: normalization (``service.providers.normalize``) checks that text (ASCII decimal syntax,
bounds, sign) before it becomes a ``Decimal``, so ``0.00006262`` stays exactly that and
``"\u0661\u0662\u0663"`` is refused instead of read as 123, as ``Decimal()`` would. Text that
reaches an event is :data:`Text` (no NUL, which PostgreSQL cannot store), integers are
:data:`Int64`.
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec

# The JSON Schema says what the text must hold: a decimal (``schemas.openapi`` spells it out).
_DECIMAL: Final = {"type": "string", "format": "decimal"}
Amount = Annotated[msgspec.Raw, msgspec.Meta(extra_json_schema=_DECIMAL)]
# msgspec takes no ``Raw | None``: an absent optional amount is an empty Raw, null is ``null``.
OptionalAmount = Annotated[
    msgspec.Raw, msgspec.Meta(extra_json_schema={"anyOf": [_DECIMAL, {"type": "null"}]})
]
# \x00 spelt as a regex escape, so the JSON Schema holds no NUL either.
Text = Annotated[str, msgspec.Meta(pattern=r"^[^\x00]*$")]
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


def _absent() -> msgspec.Raw:
    return msgspec.Raw()


class BitfinexLightningExt(msgspec.Struct):
    """``invoices[].ext`` for a Lightning (LNX) invoice."""

    hash: str | None = None
    payment_request: str | None = None
    node_pub: str | None = None


class BitfinexInvoiceEntry(msgspec.Struct):
    """One payable currency of a Bitfinex invoice (``invoices[]``)."""

    amount: Amount
    currency: Text
    payCurrency: Text
    poolCurrency: str | None = None
    address: str | None = None
    ext: BitfinexLightningExt | None = None


class BitfinexPayment(msgspec.Struct):
    """``payment`` and each entry of ``additionalPayments``."""

    txid: Text
    amount: Amount
    currency: Text
    method: Text | None = None
    status: str | None = None
    confirmations: Int64 | None = None
    created_at: str | None = None
    updated_at: str | None = None
    depositId: Int64 | None = None
    ledgerId: Int64 | None = None
    forceCompleted: bool | None = None
    amountDiff: OptionalAmount = msgspec.field(default_factory=_absent)
    # Documented beside ``payment``; accepted inside it as well.
    additionalPayments: list[BitfinexPayment] | None = None


class BitfinexWebhook(msgspec.Struct):
    """The Bitfinex Pay webhook body (seed 003). Called once, never retried."""

    id: Text
    status: str
    amount: Amount
    currency: Text
    t: Int64
    orderId: Text | None = None
    type: str | None = None
    invoices: list[BitfinexInvoiceEntry] = msgspec.field(default_factory=list)
    payment: BitfinexPayment | None = None
    additionalPayments: list[BitfinexPayment] | None = None


class CryptoSteroidPaid(msgspec.Struct):
    """``payment.paid``: what arrived so far (``received`` is a running total)."""

    received: Amount
    hash: list[Text] = msgspec.field(default_factory=list)
    fiat: OptionalAmount = msgspec.field(default_factory=_absent)
    finished: bool | None = None


class CryptoSteroidPayData(msgspec.Struct):
    """``InvoicePayData`` (seed 001)."""

    method: Text
    amount: Amount
    address: str | None = None
    net: OptionalAmount = msgspec.field(default_factory=_absent)
    fee: OptionalAmount = msgspec.field(default_factory=_absent)
    paid: CryptoSteroidPaid | None = None


class CryptoSteroidInvoice(msgspec.Struct):
    """The CryptoSteroid ``Invoice`` object sent to ``processingUrl`` (seed 001)."""

    invoiceId: Text
    fiatAmount: Amount
    fiatCurrency: Text
    status: str
    createdAt: str
    merchantId: str | None = None
    payment: CryptoSteroidPayData | None = None
    externalId: Text | None = None
    updatedAt: str | None = None
    expiresAt: str | None = None
    whoPayCommission: str | None = None


class CryptoPosCallback(msgspec.Struct):
    """The Crypto POS callback envelope: ``data`` is kept raw because the signature covers
    its exact bytes."""

    signature: str
    data: msgspec.Raw


class CryptoPosClient(msgspec.Struct):
    # name, email and phone are customer personal data: not declared, never decoded.
    referenceID: Text | None = None


class CryptoPosTransaction(msgspec.Struct):
    # ``sender`` (the customer's wallet) is personal data: not declared, never decoded.
    tx: Text
    amount: OptionalAmount = msgspec.field(default_factory=_absent)
    cryptoAmount: OptionalAmount = msgspec.field(default_factory=_absent)
    currency: Text | None = None
    timestamp: str | None = None
    network: Text | None = None


class CryptoPosInvoice(msgspec.Struct):
    """Crypto POS ``data`` (seed 002, the object ``GET /status/:id`` returns)."""

    id: Text
    paidAmount: Amount
    total: Amount
    completed: bool
    createdAt: str
    currency: Text | None = None
    subTotal: OptionalAmount = msgspec.field(default_factory=_absent)
    partialPaymentsEnabled: bool | None = None
    client: CryptoPosClient | None = None
    transactions: list[CryptoPosTransaction] = msgspec.field(default_factory=list)
