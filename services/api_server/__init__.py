"""The OpenAI-compatible HTTP server over one ``AsyncLLM`` (``tandem serve``); see README.md.

Importing this package is cheap: FastAPI and uvicorn load with ``app`` and ``server``.
"""
