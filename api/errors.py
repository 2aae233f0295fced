"""Named errors and their one mapping to HTTP: `{"error": {"code", "message", "field"}}`.

Handlers raise these; app.py turns them into responses. Anything else becomes a 500 with a request id and
no detail: tracebacks go to the log, never to a client.
"""
from __future__ import annotations


class ApiError(Exception):
    status = 500
    code = "internal_error"
    retryable = False

    def __init__(self, message: str, field: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.retry_after = retry_after

    def body(self, request_id: str | None = None) -> dict:
        error = {"code": self.code, "message": self.message, "field": self.field, "retryable": self.retryable,
                 # the same facts under the names OpenAI's clients read
                 "type": self.code, "param": self.field}
        if request_id:
            error["request_id"] = request_id
        return {"error": error}

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, int(round(self.retry_after))))}


class InvalidRequest(ApiError):
    status, code = 422, "invalid_request"


class BadRequest(ApiError):
    """The HTTP parser refused the request itself (a control byte in a header, two Content-Lengths, a broken
    chunk): nothing of it reached the app. The code is the one nginx's own 400 carries."""
    status, code = 400, "bad_request"


class HeaderTooLarge(ApiError):
    status, code = 431, "header_too_large"  # nginx's own answer for the same case uses this code too


class InvalidJson(ApiError):
    status, code = 400, "invalid_json"


class UnsupportedMediaType(ApiError):
    status, code = 415, "unsupported_media_type"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class RequestTimeout(ApiError):
    status, code, retryable = 408, "request_timeout", True

    def headers(self) -> dict[str, str]:
        # the rest of the body may still arrive: it must not be read as the next request
        return {**super().headers(), "Connection": "close"}


class ClientClosedRequest(ApiError):
    """The client hung up before its request was complete. Nobody reads the answer; the status (nginx's 499)
    is for the access log and the metrics."""
    status, code = 499, "client_closed_request"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class NotFound(ApiError):
    status, code = 404, "not_found"


class Conflict(ApiError):
    status, code = 409, "conflict"


class QueueFull(ApiError):
    status, code, retryable = 503, "queue_full", True


class NotReady(ApiError):
    status, code, retryable = 503, "not_ready", True


class Draining(ApiError):
    status, code, retryable = 503, "draining", True


class OutOfMemory(ApiError):
    status, code, retryable = 503, "out_of_memory", True


class StorageFull(ApiError):
    status, code, retryable = 507, "storage_full", True


class StorageError(ApiError):
    status, code, retryable = 503, "storage_error", True


class StorageUnavailable(ApiError):
    """The shared object store (S3) did not take or give the image: nothing was stored."""
    status, code, retryable = 503, "storage_unavailable", True


class Timeout(ApiError):
    status, code, retryable = 504, "timeout", True


class Cancelled(ApiError):
    status, code = 409, "cancelled"


class GenerationFailed(ApiError):
    status, code = 500, "generation_failed"


class TooManyStreams(ApiError):
    status, code, retryable = 429, "too_many_streams", True


class WorkerFailed(ApiError):
    status, code, retryable = 503, "worker_failed", True


class WorkerRestarted(ApiError):
    status, code, retryable = 503, "worker_restarted", True
