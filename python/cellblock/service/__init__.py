"""`cellblock serve`: sandboxes over HTTP/JSON (FastAPI on uvicorn), for other processes and
languages. Thin: every route calls `cellblock.aio`; policy and supervision stay in the core."""
