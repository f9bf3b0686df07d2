"""`llama-export serve`: an OpenAI-compatible HTTP server on the long-lived engine (`app.py`: the ASGI
app; `server.py`: running it with uvicorn, graceful shutdown)."""
