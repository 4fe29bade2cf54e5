"""Serve the Chalice app locally (Chalice's own local server, threaded).

python -m local.api_server
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
from typing import Any

from ai_rate_limiter.config import Settings
from chalice.config import Config
from chalice.local import ChaliceRequestHandler, ForbiddenError, LocalDevServer, LocalGatewayException

from local.functions import load

NO_ROUTE = json.dumps(
    {"type": "about:blank", "title": "Not Found", "status": 404, "detail": "There is no such route."}
).encode()


class RequestHandler(ChaliceRequestHandler):
    """Access lines go to the log (INFO), not straight to stderr. TCP_NODELAY: headers and
    body are separate writes, which Nagle's algorithm would hold back for a delayed ACK."""

    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: object) -> None:
        logging.getLogger("api.access").info("%s " + format, self.address_string(), *args)

    def __getattr__(self, name: str) -> Any:
        """Any other method (TRACE, PROPFIND...) goes to the app too, which answers 405 with
        `Allow` (or 404) in its own shape, where http.server would answer 501."""
        if name.startswith("do_"):
            return self._generic_handle
        raise AttributeError(name)

    def _send_error_response(self, error: LocalGatewayException) -> None:
        """No route (Chalice answers as API Gateway does, 403 "Missing Authentication Token"):
        404 problem+json, as the template has API Gateway answer."""
        if isinstance(error, ForbiddenError):
            self._send_http_response(404, {"Content-Type": "application/problem+json"}, NO_ROUTE)
            return
        super()._send_error_response(error)


def main() -> None:
    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s api %(levelname)s %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)
    app = load("api", "app").app
    server = LocalDevServer(app, Config(), settings.api_host, settings.api_port, handler_cls=RequestHandler)
    server.server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


if __name__ == "__main__":
    main()
