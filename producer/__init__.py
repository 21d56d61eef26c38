"""What a backend service imports: `Producer` (async) and `SyncProducer` (blocking)."""

from producer.client import Producer
from producer.sync import SyncProducer

__all__ = ["Producer", "SyncProducer"]
