"""Completion webhooks: when a task submitted with `webhook_url` ends, its result is POSTed
there, signed, and retried with backoff until the receiver answers 2xx.

Signing follows the Standard Webhooks scheme, with a secret per tenant derived from the
gateway's `webhook_secret` (`agentfleet gateway --webhook-secret TENANT` prints it):

    webhook-id: <task id>    webhook-timestamp: <epoch seconds>
    webhook-signature: v1,<base64 HMAC-SHA256(secret, "<id>.<timestamp>.<body>")>

A receiver checks the signature and the timestamp's age, and drops a repeated webhook-id:
delivery is at least once.  Pending webhooks are stored (`keys.webhooks`), so a gateway that
restarts resumes them; an attempt is claimed (`keys.webhook_claim`, SET NX with a TTL), so
two gateways never send the same attempt.  After `webhook_max_attempts` failures the webhook
is dropped and logged as an error.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import random
import time
from urllib.parse import urlsplit

import msgspec
from redis.exceptions import RedisError

from agentfleet.ops.gateway import convert
from agentfleet.ops.gateway.errors import ApiError
from agentfleet.schemas import keys
from agentfleet.schemas.errors import BrokerError, ResultTimeoutError
from agentfleet.schemas.wire import Result, Task

log = logging.getLogger("agentfleet.gateway.webhooks")
_POLL_S = 1.0  # a resumed webhook reads its task's stored result this often
MAX_URL_CHARS = 2000


class WebhookRecord(msgspec.Struct, kw_only=True):
    task_id: str
    model: str
    tenant: str
    url: str
    attempts: int = 0
    created_at: float = 0.0


decode_record = msgspec.msgpack.Decoder(WebhookRecord).decode
_encode = msgspec.msgpack.Encoder().encode
_json = msgspec.json.Encoder().encode


def tenant_secret(master: str, tenant: str) -> bytes:
    """The signing key of one tenant's webhooks."""
    return hmac.new(master.encode(), b"agentfleet-webhook:" + tenant.encode(),
                    hashlib.sha256).digest()


def sign(secret: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def verify(secret: bytes, headers: dict[str, str], body: bytes, *,
           max_age_s: float = 300) -> bool:
    """What a receiver runs (written here so the tests and docs share it)."""
    try:
        timestamp = int(headers["webhook-timestamp"])
        expected = sign(secret, headers["webhook-id"], timestamp, body)
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > max_age_s:
        return False
    return any(hmac.compare_digest(expected, s) for s in headers["webhook-signature"].split())


class Webhooks:
    def __init__(self, gw):
        self.gw = gw
        self.settings = gw.settings
        self.redis = gw.redis
        self._client = None

    async def start(self) -> None:
        import httpx

        self._client = httpx.AsyncClient(timeout=self.settings.webhook_timeout_s)
        try:
            stored = await self.redis.hgetall(keys.webhooks())
        except RedisError as exc:
            raise BrokerError(f"reading pending webhooks failed: {exc}") from exc
        for raw in stored.values():  # left by a gateway that stopped: resume them
            self.gw.spawn(self._run(decode_record(raw), push=False))
        if stored:
            log.info("resuming %d pending webhooks", len(stored))

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def check_url(self, url: str) -> None:
        if not self.settings.webhook_secret:
            raise ApiError(400, "webhook_url: webhooks are off on this gateway (no "
                           "webhook_secret set)", param="webhook_url", code="webhooks_off")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc or len(url) > MAX_URL_CHARS:
            raise ApiError(400, f"webhook_url: {url[:100]!r} is not an http(s) URL of at most "
                           f"{MAX_URL_CHARS} characters", param="webhook_url")

    async def register(self, task: Task, url: str) -> None:
        record = WebhookRecord(task_id=task.id, model=task.model, tenant=task.tenant, url=url,
                               created_at=time.time())
        try:
            await self.redis.hset(keys.webhooks(), task.id, _encode(record))
        except RedisError as exc:
            raise BrokerError(f"storing the webhook of {task.id} failed: {exc}") from exc
        self.gw.spawn(self._run(record, push=True))

    async def _run(self, record: WebhookRecord, *, push: bool) -> None:
        result = await self._result(record, push)
        await self._deliver(record, result)

    async def _result(self, record: WebhookRecord, push: bool) -> Result:
        producer = self.gw.producer
        if push:  # this gateway submitted it: the result comes on its reply stream
            try:
                return await producer.wait(record.task_id, timeout_s=3600)
            except ResultTimeoutError:
                pass
        while True:
            try:
                result = await producer.get_result(record.task_id, record.model)
            except BrokerError as exc:
                log.warning("webhook of %s: reading its result failed (%s)", record.task_id,
                            exc)
                result = None
            if result is not None:
                return result
            await asyncio.sleep(_POLL_S)

    async def _deliver(self, record: WebhookRecord, result: Result) -> None:
        s = self.settings
        body = _json({"id": record.task_id, "type": "task.completed",
                      "created_at": int(time.time()),
                      "data": convert.task_view(record.tenant, record.task_id,
                                                result.status.value, result=result)})
        secret = tenant_secret(s.webhook_secret, record.tenant)
        metrics = self.gw.metrics.webhooks
        while record.attempts < s.webhook_max_attempts:
            if await self._claim(record.task_id):
                ok, why = await self._post(record, body, secret)
                record.attempts += 1
                await self._release(record.task_id)
                if ok:
                    metrics.labels("delivered").inc()
                    await self._forget(record.task_id)
                    return
                try:
                    await self.redis.hset(keys.webhooks(), record.task_id, _encode(record))
                except RedisError as exc:
                    log.warning("webhook of %s: recording attempt failed (%s)",
                                record.task_id, exc)
                if record.attempts >= s.webhook_max_attempts:
                    break
                metrics.labels("retried").inc()
                log.info("webhook of %s to %s failed (%s); attempt %d of %d", record.task_id,
                         record.url, why, record.attempts, s.webhook_max_attempts,
                         extra={"task_id": record.task_id})
            elif not await self.redis.hexists(keys.webhooks(), record.task_id):
                return  # another gateway delivered it
            delay_s = min(s.webhook_retry_max_s, s.webhook_retry_base_s * 2 ** record.attempts)
            await asyncio.sleep(delay_s * (0.5 + random.random() / 2))
        metrics.labels("failed").inc()
        log.error("webhook of %s to %s dropped after %d attempts", record.task_id, record.url,
                  record.attempts, extra={"task_id": record.task_id})
        await self._forget(record.task_id)

    async def _post(self, record: WebhookRecord, body: bytes, secret: bytes) -> tuple[bool, str]:
        import httpx

        timestamp = int(time.time())
        headers = {"content-type": "application/json", "webhook-id": record.task_id,
                   "webhook-timestamp": str(timestamp),
                   "webhook-signature": sign(secret, record.task_id, timestamp, body)}
        try:
            reply = await self._client.post(record.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return False, f"{type(exc).__name__}: {exc}"
        return 200 <= reply.status_code < 300, f"status {reply.status_code}"

    async def _claim(self, task_id: str) -> bool:
        ttl_ms = int((self.settings.webhook_timeout_s + 5) * 1000)
        try:
            return bool(await self.redis.set(keys.webhook_claim(task_id), self.gw.producer.id,
                                             nx=True, px=ttl_ms))
        except RedisError as exc:
            log.warning("webhook of %s: claiming failed (%s)", task_id, exc)
            return False

    async def _release(self, task_id: str) -> None:
        try:
            await self.redis.delete(keys.webhook_claim(task_id))
        except RedisError as exc:  # it expires on its own
            log.warning("webhook of %s: releasing the claim failed (%s)", task_id, exc)

    async def _forget(self, task_id: str) -> None:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hdel(keys.webhooks(), task_id)
                pipe.delete(keys.webhook_claim(task_id))
                await pipe.execute()
        except RedisError as exc:
            log.warning("webhook of %s: clearing its record failed (%s)", task_id, exc)
