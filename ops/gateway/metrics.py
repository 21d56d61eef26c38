"""The gateway's Prometheus metrics, in a registry of its own, served on /metrics.

Labels stay bounded: `route` is the route's name (a fixed set, "unmatched" for the rest),
`code` the HTTP status; never a tenant or a task id.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds: a request that waits for its result spans the queue and the engine.
_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
            60, 300)
_DELAY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("agentfleet_gateway_requests_total",
                                "HTTP requests answered, by route and status code",
                                ["route", "code"], registry=r)
        self.duration = Histogram("agentfleet_gateway_request_duration_seconds",
                                  "Time from a request's arrival to its last byte, by route",
                                  ["route"], buckets=_BUCKETS, registry=r)
        self.inflight = 0  # requests being served: a plain int, read at scrape time
        Gauge("agentfleet_gateway_inflight_requests", "Requests being served",
              registry=r).set_function(lambda: self.inflight)
        self.disconnects = Counter("agentfleet_gateway_disconnects_total",
                                   "Clients that left before their answer: their task was "
                                   "cancelled", registry=r)
        self.stream_delay = Histogram("agentfleet_gateway_stream_delay_seconds",
                                      "From the engine producing output to the gateway "
                                      "sending it", buckets=_DELAY_BUCKETS, registry=r)
        self.webhooks = Counter("agentfleet_gateway_webhook_deliveries_total",
                                "Webhook attempts by outcome: delivered, retried, failed",
                                ["outcome"], registry=r)
        self._children: dict[tuple[str, int], tuple] = {}

    def observe(self, route: str, code: int, seconds: float) -> None:
        child = self._children.get((route, code))
        if child is None:
            child = self._children[(route, code)] = (
                self.requests.labels(route, str(code)), self.duration.labels(route))
        child[0].inc()
        child[1].observe(seconds)
