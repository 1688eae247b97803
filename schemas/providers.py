"""What each provider POSTs to us, as it sends it.

Structs ignore unknown fields (providers add fields without notice) and declare only what
payhook uses or must validate. Customer personal data (Bitfinex ``customerInfo``, Crypto POS
``client.name``/``email``/``phone``, a transaction's ``sender`` wallet) is deliberately not
declared, so the decoder drops it before anything else can see it.

Amounts are ``Decimal`` decoded from the JSON text, whether the provider sends a number or a
string: ``0.00006262`` stays exactly that.
"""

from __future__ import annotations

from decimal import Decimal

import msgspec


class BitfinexLightningExt(msgspec.Struct):
    """``invoices[].ext`` for a Lightning (LNX) invoice."""

    hash: str | None = None
    payment_request: str | None = None
    node_pub: str | None = None


class BitfinexInvoiceEntry(msgspec.Struct):
    """One payable currency of a Bitfinex invoice (``invoices[]``)."""

    amount: Decimal
    currency: str
    payCurrency: str
    poolCurrency: str | None = None
    address: str | None = None
    ext: BitfinexLightningExt | None = None


class BitfinexPayment(msgspec.Struct):
    """``payment`` and each entry of ``additionalPayments``."""

    txid: str
    amount: Decimal
    currency: str
    method: str | None = None
    status: str | None = None
    confirmations: int | None = None
    created_at: str | None = None
    updated_at: str | None = None
    depositId: int | None = None
    ledgerId: int | None = None
    forceCompleted: bool | None = None
    amountDiff: Decimal | None = None
    # Documented beside ``payment``; accepted inside it as well.
    additionalPayments: list[BitfinexPayment] | None = None


class BitfinexWebhook(msgspec.Struct):
    """The Bitfinex Pay webhook body (seed 003). Called once, never retried."""

    id: str
    status: str
    amount: Decimal
    currency: str
    t: int
    orderId: str | None = None
    type: str | None = None
    invoices: list[BitfinexInvoiceEntry] = msgspec.field(default_factory=list)
    payment: BitfinexPayment | None = None
    additionalPayments: list[BitfinexPayment] | None = None


class CryptoSteroidPaid(msgspec.Struct):
    """``payment.paid``: what arrived so far (``received`` is a running total)."""

    received: Decimal
    hash: list[str] = msgspec.field(default_factory=list)
    fiat: Decimal | None = None
    finished: bool | None = None


class CryptoSteroidPayData(msgspec.Struct):
    """``InvoicePayData`` (seed 001)."""

    method: str
    amount: Decimal
    address: str | None = None
    net: Decimal | None = None
    fee: Decimal | None = None
    paid: CryptoSteroidPaid | None = None


class CryptoSteroidInvoice(msgspec.Struct):
    """The CryptoSteroid ``Invoice`` object sent to ``processingUrl`` (seed 001)."""

    invoiceId: str
    fiatAmount: Decimal
    fiatCurrency: str
    status: str
    createdAt: str
    merchantId: str | None = None
    payment: CryptoSteroidPayData | None = None
    externalId: str | None = None
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
    referenceID: str | None = None


class CryptoPosTransaction(msgspec.Struct):
    # ``sender`` (the customer's wallet) is personal data: not declared, never decoded.
    tx: str
    amount: Decimal | None = None
    cryptoAmount: Decimal | None = None
    currency: str | None = None
    timestamp: str | None = None
    network: str | None = None


class CryptoPosInvoice(msgspec.Struct):
    """Crypto POS ``data`` (seed 002, the object ``GET /status/:id`` returns)."""

    id: str
    paidAmount: Decimal
    total: Decimal
    completed: bool
    createdAt: str
    currency: str | None = None
    subTotal: Decimal | None = None
    partialPaymentsEnabled: bool | None = None
    client: CryptoPosClient | None = None
    transactions: list[CryptoPosTransaction] = msgspec.field(default_factory=list)
