"""Serving the app with uvicorn: loopback unless told otherwise, SIGTERM/SIGINT drain the requests in
flight (up to a grace period) and then close the engine; a failed engine ends the server with an error
exit, for a supervisor to restart it."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading

from llama_export.engine.engine import Engine
from llama_export.errors import InputError, LlamaExportError

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
GRACE_S = 30  # how long a shutdown waits for the requests in flight


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or one clear error (a port in use, an address not on this machine)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.set_inheritable(True)
        return sock
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or --host") from None


def serve(engine: Engine, *, model_name: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          api_key: str | None = None, max_queue: int = 256, grace_s: float = GRACE_S,
          on_started=None) -> None:
    """Serve `engine` until SIGTERM/SIGINT (returns) or until the engine fails (raises
    LlamaExportError once the server has stopped). `on_started(port, stop)` runs once it listens (`port`
    0 takes a free one; `stop()` begins the shutdown a signal would)."""
    import uvicorn

    from llama_export.serve.app import create_app

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            """SIGINT/SIGTERM start the graceful shutdown; unlike uvicorn's own, the signal is not
            raised again afterwards: a drained shutdown is a normal end (exit 0)."""
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in originals.items():
                    signal.signal(sig, handler)

    app = create_app(engine, model_name=model_name, api_key=api_key, max_queue=max_queue)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=grace_s, lifespan="off")
    server = Server(config)
    engine.on_error(lambda e: setattr(server, "should_exit", True))
    sock = _listen(host, port)
    if on_started is not None:
        config_started = server.startup

        async def startup(sockets=None):
            await config_started(sockets)
            on_started(sock.getsockname()[1], lambda: setattr(server, "should_exit", True))

        server.startup = startup
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        engine.close(timeout=grace_s)
    if engine.failed is not None:
        raise LlamaExportError(f"the model failed while serving: {engine.failed}; restart the server")
