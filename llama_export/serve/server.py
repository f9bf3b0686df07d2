"""Serving the app with uvicorn: loopback unless told otherwise, SIGTERM/SIGINT drain the requests in
flight (up to a grace period) and then close the engine; a failed engine ends the server with an error
exit, for a supervisor to restart it."""

from __future__ import annotations

import logging

from llama_export.engine.engine import Engine
from llama_export.errors import LlamaExportError

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
GRACE_S = 30  # how long a shutdown waits for the requests in flight


def serve(engine: Engine, *, model_name: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          api_key: str | None = None, max_queue: int = 256, grace_s: float = GRACE_S,
          on_started=None) -> None:
    """Serve `engine` until SIGTERM/SIGINT (returns) or until the engine fails (raises
    LlamaExportError once the server has stopped). `on_started(server)` runs once it listens."""
    import uvicorn

    from llama_export.serve.app import create_app

    app = create_app(engine, model_name=model_name, api_key=api_key, max_queue=max_queue)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=grace_s, lifespan="off")
    server = uvicorn.Server(config)
    engine.on_error(lambda e: setattr(server, "should_exit", True))
    if on_started is not None:
        config_started = server.startup

        async def startup(sockets=None):
            await config_started(sockets)
            on_started(server)

        server.startup = startup
    try:
        server.run()
    finally:
        engine.close(timeout=grace_s)
    if engine.failed is not None:
        raise LlamaExportError(f"the model failed while serving: {engine.failed}; restart the server")
