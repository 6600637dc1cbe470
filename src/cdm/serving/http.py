"""The HTTP server under `cdm serve`: uvicorn with timeouts for slow or idle connections
(docs/security.md). uvicorn bounds an idle keep-alive connection, but not one that sends its
headers slowly (or never) after connecting; `TimedH11` closes such a connection after
`header_timeout` seconds. The body's own timeout is `middleware.BodyLimit`'s.
"""

from __future__ import annotations

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .config import ServeConfig


def timed_h11(header_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose next request's headers are not all in
    within `header_timeout` seconds of its connecting or of its last response."""

    class TimedH11(H11Protocol):
        _header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _waiting_for_headers(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _too_slow(self) -> None:
            self._header_timer = None
            if self._waiting_for_headers() and not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if not self._waiting_for_headers():  # a request is in: the body has its own timeout
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return TimedH11


def server_config(app, cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000,
                  log_level: str = "info") -> uvicorn.Config:
    """uvicorn's settings for `cdm serve`: the timed h11 protocol and the idle keep-alive timeout."""
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=timed_h11(cfg.header_timeout),
                          timeout_keep_alive=max(1, round(cfg.idle_timeout)))
