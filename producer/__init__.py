"""What a backend service imports: `Producer` (async) and `SyncProducer` (blocking)."""

from agentfleet.producer.client import Producer
from agentfleet.producer.sync import SyncProducer

__all__ = ["Producer", "SyncProducer"]
