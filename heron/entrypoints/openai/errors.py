"""Errors in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

from http import HTTPStatus

from starlette.responses import JSONResponse

# OpenAI's `type` for each status the server returns; the client maps the status to
# its exception classes (BadRequestError, AuthenticationError, NotFoundError, ...).
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "server_error",
}


class OpenAIError(Exception):
    """An error the server answers with `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers   # e.g. Retry-After on a 503


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    """A 400 for invalid parameters; `param` names the offending field when known."""
    return OpenAIError(400, message, param)


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict:
    """The JSON body OpenAI's clients parse into their exceptions."""
    return {"error": {"message": message,
                      "type": _TYPES.get(status, HTTPStatus(status).phrase),
                      "param": param, "code": code if code is not None else status}}


def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status,
                        headers=headers)


def from_exception(error: OpenAIError) -> JSONResponse:
    return error_response(error.status, error.message, error.param, error.code, error.headers)
