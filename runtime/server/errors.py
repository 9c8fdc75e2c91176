"""HTTP errors in one JSON shape for both APIs: {"error": {"message", "type", "param", "code"}}.

OpenAI's clients read `error.message`; SGLang's frontend only needs a non-200 status and a body.
`code` carries the HTTP status (as SGLang does), `param` the offending request field.
"""
from __future__ import annotations

import json
import math
from typing import Any

from aiohttp import web

from radixlm.runtime.sampling_params import InvalidRequestError

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """Raised by handlers; the error middleware turns it into a JSON response."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or {}

    @classmethod
    def bad_request(cls, param: str | None, message: str) -> "ApiError":
        return cls(400, f"{param}: {message}" if param and not message.startswith(param) else message, param)

    @classmethod
    def from_invalid(cls, exc: InvalidRequestError, rename: dict[str, str] | None = None) -> "ApiError":
        """An InvalidRequestError from the runtime's parsers; `rename` maps its field names to the API's."""
        field = exc.field
        message = str(exc)
        if rename:
            new = rename.get(field)
            if new is None and field.startswith("sampling_params."):
                new = rename.get(field.removeprefix("sampling_params."), field.removeprefix("sampling_params."))
            if new is not None and new != field:
                message = new + message[len(field):] if message.startswith(field) else message
                field = new
        return cls(400, message, field)

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param)


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error" if status >= 500 else
                                                             "invalid_request_error"),
                      "param": param, "code": status}}


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=dumps(payload), status=status, content_type="application/json", headers=headers)


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    return json_response(error_body(status, message, param), status, headers)


def dumps(payload: Any) -> str:
    """Compact JSON that always encodes as UTF-8: non-finite numbers are clamped, and text holding
    a lone surrogate (never from a validated request, but possibly from a model's bytes) is sent
    with \\u escapes instead of failing the response."""
    try:
        text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=_default)
    except ValueError:  # an inf/nan somewhere (e.g. a -inf logprob): JSON has no such numbers
        payload = _finite(payload)
        text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), default=_default)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(payload, ensure_ascii=True, separators=(",", ":"), default=_default)
    return text


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if value != value else (-9999.0 if value < 0 else 9999.0)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _default(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
