"""Inference service: a target LLM plus a drafter behind /generate and OpenAI-compatible APIs.

Modules: ``settings`` (environment), ``main`` (app factory and lifespan), ``api`` (routes),
``deps`` (dependencies, API key), ``specs`` (requests -> one GenerationSpec), ``serving`` (the
decode loop per request), ``drafters`` (the served drafter and its version), ``responses`` (JSON
bodies and SSE), ``metrics`` (Prometheus), ``errors``.
"""
