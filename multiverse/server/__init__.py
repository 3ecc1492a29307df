"""The OpenAI-compatible HTTP server over the fork/join engine (``multiverse serve``).

``create_app(llm, model_name, ServerConfig(...))`` (:mod:`.app`) builds the FastAPI app; one
:class:`~multiverse.server.engine_thread.EngineThread` owns the engine; :mod:`.streaming` turns
a live branch tree into SSE chunks; :mod:`.schemas` are the request models, :mod:`.errors` the
OpenAI error objects, :mod:`.auth` the API key and body limit, :mod:`.metrics` ``/metrics``,
:mod:`.runner` runs it under uvicorn with a graceful shutdown; :mod:`.prompting` is the prompt
format chats get (the model's recorded SPEC 1.3 suffix, shared with ``multiverse generate``; no
fastapi). fastapi and uvicorn (extra
``server``) are imported only by these modules; nothing in the library imports them.
"""
