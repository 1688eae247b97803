"""Payment providers: one module each, behind one small interface and a registry.

A provider's module holds everything that is that provider's: its notification decoder, its
normalization into the provider-neutral :class:`~schemas.events.InvoiceEvent`, how its
notifications authenticate and (with recovery) its API client. The rest of payhook reaches
providers only through :data:`PROVIDERS` (or :data:`PER_ORDER` and :data:`MERCHANT_SIGNED`, by
how they authenticate), so adding one is a module here, its Structs in ``schemas/providers.py``
and its tests.

Two ways to authenticate:

- ``per_order``: the provider's webhook URL is set per invoice, so it carries a secret minted
  for that order (:mod:`service.ingest.secrets`); the order id is in the URL.
- ``merchant_signature``: one URL per merchant; the provider signs each body with a merchant
  secret from the settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final, Literal, Protocol, TypeVar

from schemas.events import InvoiceEvent, Origin
from service.providers.bitfinex import BITFINEX
from service.providers.cryptopos import CRYPTOPOS
from service.providers.cryptosteroid import CRYPTOSTEROID
from service.providers.samples import SampleStatus
from service.settings import Secret, Settings

N = TypeVar("N")


class Provider(Protocol[N]):
    """What every provider offers. ``N`` is its notification Struct."""

    @property
    def name(self) -> str:
        """The path segment (``/v1/webhooks/{name}``) and the events' ``provider``."""

    @property
    def title(self) -> str:
        """How people write its name."""

    @property
    def reports_running_total(self) -> bool:
        """Its payments state the total paid so far, not each transaction's own amount."""

    def decode(self, body: bytes) -> N:
        """The notification from its (authenticated) bytes; InvalidJson or InvalidPayload."""

    def order_id_of(self, notification: N) -> str | None:
        """The merchant's order id the notification is about, if it states one."""

    def normalize(
        self, notification: N, received_at: datetime, origin: Origin = "webhook"
    ) -> InvoiceEvent:
        """The provider-neutral event; InvalidPayload for what cannot be money or a time.
        ``origin`` says how it came: a notification, or read back by ``payhook recover``."""

    def sample(self, status: SampleStatus, invoice_id: str, order_id: str, now: datetime) -> bytes:
        """A realistic notification body of ``status`` (``payhook send-test``); for a
        merchant-signed provider, the part it signs. NoSample for a status it never sends."""


class PerOrderProvider(Provider[N], Protocol[N]):
    @property
    def authentication(self) -> Literal["per_order"]: ...

    @property
    def token_in_url(self) -> bool:
        """It sends no header: the order's secret rides in the webhook URL's query string."""

    @property
    def registration_hint(self) -> str:
        """Where the secret and URL go on the provider's invoice (``payhook secret``)."""


class MerchantSignedProvider(Provider[N], Protocol[N]):
    @property
    def authentication(self) -> Literal["merchant_signature"]: ...

    @property
    def secret_setting(self) -> str:
        """The environment variable holding the merchant secret."""

    def merchant_secret(self, settings: Settings) -> Secret | None:
        """The merchant secret, or None when this provider is not configured."""

    def authenticate(self, body: bytes, secret: Secret) -> bytes | None:
        """The signed bytes to decode, or None when the signature is missing or wrong."""

    def sign(self, data: bytes, secret: Secret) -> bytes:
        """The body the provider sends for the signed ``data`` (``payhook send-test``)."""


PER_ORDER: Final[Mapping[str, PerOrderProvider[Any]]] = {
    p.name: p for p in (BITFINEX, CRYPTOSTEROID)
}
MERCHANT_SIGNED: Final[Mapping[str, MerchantSignedProvider[Any]]] = {
    p.name: p for p in (CRYPTOPOS,)
}
PROVIDERS: Final[Mapping[str, Provider[Any]]] = {**PER_ORDER, **MERCHANT_SIGNED}
# Reconciliation reads these providers' payments as a running total.
RUNNING_TOTAL_PROVIDERS: Final = frozenset(
    name for name, p in PROVIDERS.items() if p.reports_running_total
)


def get(name: str) -> Provider[Any]:
    """The provider called ``name``; KeyError for an unknown one."""
    return PROVIDERS[name]
