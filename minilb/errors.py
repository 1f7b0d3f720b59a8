"""The errors minilb raises.

    MinilbError                 base of everything minilb raises on purpose
    ├── ConfigError             the configuration breaks a rule; the CLI exits with 2
    └── HTTPError               answered to the client in the OpenAI error shape
        ├── BadRequest          400: the body is not what the route accepts
        ├── NotFound            404: no such route
        ├── MethodNotAllowed    405: the route exists, the method does not
        ├── PayloadTooLarge     413: the body is over the configured limit
        ├── UpstreamRejected    4xx passed on from a prefill or decode server
        ├── UpstreamFailed      502: a server could not be reached or answered 5xx
        ├── NoServerAvailable   503: no prefill or no decode server to pick
        └── UpstreamTimeout     504: a server did not answer within the timeout
"""

from __future__ import annotations

import msgspec

_ENCODER = msgspec.json.Encoder()


class MinilbError(Exception):
    """Base of every error minilb raises on purpose."""


class ConfigError(MinilbError):
    """The configuration breaks a rule; the message names the field, value and rule."""


class HTTPError(MinilbError):
    """An error answered to the client as `{"error": {"message", "type", "code"}}`."""

    status: int = 500
    type: str = "server_error"

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

    def body(self, request_id: bytes | None = None) -> bytes:
        error: dict[str, object] = {"message": self.message, "type": self.type, "code": self.status}
        if request_id is not None:
            error["request_id"] = request_id.decode("latin-1")
        return _ENCODER.encode({"error": error})


class BadRequest(HTTPError):
    status = 400
    type = "invalid_request_error"


class NotFound(HTTPError):
    status = 404
    type = "not_found_error"


class MethodNotAllowed(HTTPError):
    status = 405
    type = "method_not_allowed_error"

    def __init__(self, message: str, *, allowed: tuple[str, ...]) -> None:
        super().__init__(message)
        self.allowed = allowed


class PayloadTooLarge(HTTPError):
    status = 413
    type = "request_too_large_error"


class UpstreamRejected(HTTPError):
    """A server refused the request with a 4xx: the client's fault, passed on as is."""

    type = "invalid_request_error"


class UpstreamFailed(HTTPError):
    status = 502
    type = "upstream_error"


class NoServerAvailable(HTTPError):
    status = 503
    type = "service_unavailable_error"


class UpstreamTimeout(HTTPError):
    status = 504
    type = "upstream_timeout_error"
