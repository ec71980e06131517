"""The one exception a request handler raises for a bad request: it becomes an HTTP status and a JSON
body {"error": message}."""


class RequestError(Exception):
    """A problem with one request: becomes {"error": message} with this status. Messages never quote
    tensor content. close: answer with `Connection: close` (the rest of the body is not read)."""

    def __init__(self, message: str, status: int = 400, close: bool = False):
        super().__init__(message)
        self.status = status
        self.close = close
