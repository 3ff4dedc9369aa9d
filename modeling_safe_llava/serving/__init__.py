"""`safe-llava serve`: an OpenAI-compatible HTTP server whose every answer carries SafeLlava's safety verdict.

Not remote code: this package needs the `[serve]` extra (FastAPI, uvicorn, prometheus-client). `backend.py` holds the
contract between the HTTP layer (`app.py`) and the two backends: `local.py` (the whole model in this process) and
`gate.py` (a safety gate in front of an OpenAI-compatible engine serving the stock LLaVA weights).
"""
