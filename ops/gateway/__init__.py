"""`agentfleet gateway`: an OpenAI-compatible front door for any language.

  app.py        the Gateway (one Producer per process) and the core routes: chat and text
                completions, models, agentfleet's task API, traces, health and metrics
  streaming.py  `stream: true` as server-sent events from the worker's partial output
  files.py      the Files API over a directory;  batches.py  the Batch API over bulk jobs
  approvals_routes.py  approval gates over HTTP (the store: ops/approvals.py)
  webhooks.py   signed completion webhooks, retried with backoff
  types.py      request bodies;  convert.py  requests into tasks, results into answers
  errors.py     OpenAI's error shape;  quota.py  an admission hook;  metrics.py
  openapi.py    the OpenAPI document;  server.py  the HTTP server (uvicorn or granian)
See docs/gateway.md.
"""

from agentfleet.ops.gateway.app import create_app

__all__ = ["create_app"]
