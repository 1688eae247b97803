"""The errors payhook answers with. One hierarchy, mapped to HTTP in one place (app.observed).

Each error carries its HTTP status and the stable ``error`` code of the public contract; the
``detail`` is for humans and never contains a secret or customer data.
"""

from __future__ import annotations

from typing import ClassVar


class PayhookError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"
    # False where nobody is left to answer: the code names the outcome in logs and metrics.
    answered: ClassVar[bool] = True

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(PayhookError):
    status = 404
    code = "not_found"


class UnknownProvider(PayhookError):
    status = 404
    code = "unknown_provider"


class MethodNotAllowed(PayhookError):
    status = 405
    code = "method_not_allowed"

    def __init__(self, detail: str, allow: str) -> None:
        super().__init__(detail)
        self.allow = allow


class PayloadTooLarge(PayhookError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(PayhookError):
    status = 415
    code = "unsupported_media_type"


class Unauthorized(PayhookError):
    status = 401
    code = "unauthorized"


class RateLimited(PayhookError):
    status = 429
    code = "rate_limited"


class InvalidJson(PayhookError):
    status = 400
    code = "invalid_json"


class InvalidPayload(PayhookError):
    status = 400
    code = "invalid_payload"


class OrderMismatch(PayhookError):
    status = 400
    code = "order_mismatch"


class Unavailable(PayhookError):
    """The event could not be made durable (broker did not ack, spool full)."""

    status = 503
    code = "unavailable"

    def __init__(self, detail: str, retry_after: int = 5) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class BodyTimeout(PayhookError):
    """The body did not arrive within ``PAYHOOK_BODY_TIMEOUT``: the connection is closed
    without an answer."""

    status = 408
    code = "body_timeout"
    answered = False


class ClientGone(PayhookError):
    """The client closed the connection before its body arrived: there is nobody to answer
    (499, as proxies log it)."""

    status = 499
    code = "client_gone"
    answered = False
