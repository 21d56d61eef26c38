"""Bulk jobs in the OpenAI Batch format: submit a file, follow its status, read its results.

    async with BatchClient.from_url("redis://localhost:6379") as batches:
        report = await batches.submit("requests.jsonl", model_map={"gpt-4o-mini": "smollm2-135m"})
        await batches.wait(report.batch_id)
        await batches.write_results(report.batch_id, "out.jsonl", errors_path="errors.jsonl")

Submitting reads the input twice, a line at a time, so memory stays flat whatever its size:
a validation pass checks every line (and, through a hash in Redis, that no custom id repeats)
and queues nothing if one is invalid (unless `skip_invalid`); then a submit pass enqueues the
tasks in chunks with `Producer.submit_many`, into each model's bulk lane.  Every task has a
deterministic id and idempotency key (`<batch id>:<custom id>`): submitting the same file again
under the same batch id, say after the submitter crashed, queues nothing twice.

Nothing polls per task.  Workers count each finished task into the job's counts hash of its
model, atomically with its result; the status is derived on demand from those counts (one
HGETALL per model) and the job's record, and the first status check that finds every request
accounted for finalizes the job (`finalizing`, then `completed`, `expired` or `cancelled`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path

import msgspec
from redis.exceptions import RedisError

from agentfleet.producer.client import Producer
from agentfleet.producer.openai_batch import (
    LineContext,
    LineError,
    custom_id_of,
    output_line,
    parse_line,
    parse_model_map,
    parse_window,
    valid_batch_id,
)
from agentfleet.schemas import keys
from agentfleet.schemas.errors import BatchError, BrokerError, InvalidBatchFileError, ValidationError
from agentfleet.schemas.scripts import lua
from agentfleet.schemas.tenants import check_name as check_tenant_name
from agentfleet.schemas.settings import Settings
from agentfleet.schemas.wire import Result, Status, Task, decode_result

log = logging.getLogger("agentfleet.batch")

CHUNK_LINES = 2000  # tasks per submit_many call (and custom ids per duplicate check)
MAX_QUEUED = 1_000_000  # a bulk lane longer than this pauses the submit pass (backpressure)
MAX_REPORTED_ERRORS = 1000  # invalid lines kept for the report; the count is exact
MAX_STORED_ERRORS = 100  # invalid lines kept in the job's record
PAGE = 1000  # results read per XRANGE / XREAD

VALIDATING, FAILED, IN_PROGRESS = "validating", "failed", "in_progress"
FINALIZING, COMPLETED, EXPIRED = "finalizing", "completed", "expired"
CANCELLING, CANCELLED = "cancelling", "cancelled"
FINAL = frozenset((COMPLETED, EXPIRED, CANCELLED))



class SubmitReport(msgspec.Struct, kw_only=True):
    """What `BatchClient.submit` did."""

    batch_id: str
    endpoint: str
    total: int  # valid requests: the job's size
    models: dict[str, int]  # requests per model
    invalid: int = 0  # lines refused (queued only with skip_invalid: never queued)
    errors: list[tuple[int, str]] = []  # the first invalid lines: (line number, reason)
    resumed: bool = False  # the batch id already held this file: only what was missing went in
    validate_s: float = 0.0
    submit_s: float = 0.0


class BatchStatus(msgspec.Struct, kw_only=True):
    """A job's state, derived from its record and its per-model counts."""

    id: str
    status: str
    endpoint: str = ""
    input_file: str = ""
    completion_window: str = ""
    total: int = 0
    by_status: dict[str, int] = {}  # finished requests by result status (succeeded, ...)
    models: dict[str, tuple[int, int]] = {}  # model -> (requests, finished)
    enqueued: int = 0  # requests the submit pass has handed to the queue so far
    invalid: int = 0
    errors: list[tuple[int, str]] = []
    finished: bool = False  # every request is accounted for and the job is finalized
    created_at: float = 0.0
    in_progress_at: float | None = None
    expires_at: float | None = None
    finalizing_at: float | None = None
    completed_at: float | None = None
    failed_at: float | None = None
    expired_at: float | None = None
    cancelling_at: float | None = None
    cancelled_at: float | None = None

    @property
    def done(self) -> int:
        return sum(self.by_status.values())

    @property
    def completed(self) -> int:
        return self.by_status.get(Status.SUCCEEDED.value, 0)

    @property
    def failed(self) -> int:
        """Finished without an answer: failed, dead-lettered, expired or cancelled."""
        return self.done - self.completed

    @property
    def settled(self) -> bool:
        """Nothing more will change: finalized, or refused at validation."""
        return self.finished or self.status == FAILED

    def to_openai(self) -> dict[str, object]:
        """The OpenAI Batch object (`GET /v1/batches/{id}`), with agentfleet's extras last."""
        def at(value: float | None) -> int | None:
            return None if value is None else int(value)

        return {
            "id": self.id, "object": "batch", "endpoint": self.endpoint,
            "errors": {"object": "list", "data": [
                {"code": "invalid_request", "message": reason, "param": None, "line": line}
                for line, reason in self.errors]} if self.errors else None,
            "input_file_id": self.input_file, "completion_window": self.completion_window,
            "status": self.status, "output_file_id": None, "error_file_id": None,
            "created_at": at(self.created_at), "in_progress_at": at(self.in_progress_at),
            "expires_at": at(self.expires_at), "finalizing_at": at(self.finalizing_at),
            "completed_at": at(self.completed_at), "failed_at": at(self.failed_at),
            "expired_at": at(self.expired_at), "cancelling_at": at(self.cancelling_at),
            "cancelled_at": at(self.cancelled_at),
            "request_counts": {"total": self.total, "completed": self.completed,
                               "failed": self.failed},
            "metadata": None,
            "by_status": self.by_status, "enqueued": self.enqueued, "invalid": self.invalid,
            "models": {m: {"total": t, "done": d} for m, (t, d) in self.models.items()},
        }


class ResultsReport(msgspec.Struct, kw_only=True):
    output: int = 0  # lines written to the output file
    errors: int = 0  # lines written to the error file (or to the output file, without one)
    missing: int = 0  # requests of the job with no result yet


class _Scan(msgspec.Struct, kw_only=True):
    """What the validation pass found."""

    models: dict[str, int] = {}
    invalid: int = 0
    duplicates: int = 0
    errors: list[tuple[int, str]] = []
    digest: str = ""

    def refuse(self, line_no: int, reason: str) -> None:
        self.invalid += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append((line_no, reason))

    @property
    def total(self) -> int:
        return sum(self.models.values())


class _Source:
    """The input read twice: a file by its path, a re-iterable as is, an iterator spooled to a
    temporary file on the first pass (so neither pass holds more than a line)."""

    def __init__(self, source: str | os.PathLike | Iterable[bytes | str | dict]):
        self._path: Path | None = None
        self._lines: Iterable | None = None
        self._spool = None
        if isinstance(source, (str, os.PathLike)):
            self._path = Path(source)
        else:
            self._lines = source
            if iter(source) is source:
                self._spool = tempfile.TemporaryFile()
        self.sha256 = hashlib.sha256()

    @staticmethod
    def name_of(source: object) -> str:
        return Path(source).name if isinstance(source, (str, os.PathLike)) else ""

    def first_pass(self) -> Iterator[bytes]:
        digest = self.sha256
        if self._path is not None:
            with self._path.open("rb") as f:
                for raw in f:
                    digest.update(raw)
                    yield raw
            return
        spool = self._spool
        for item in self._lines:
            raw = _as_bytes(item)
            digest.update(raw)
            digest.update(b"\n")
            if spool is not None:
                spool.write(raw)
                spool.write(b"\n")
            yield raw

    def second_pass(self) -> Iterator[bytes]:
        if self._path is not None:
            with self._path.open("rb") as f:
                yield from f
        elif self._spool is not None:
            self._spool.seek(0)
            yield from self._spool
        else:
            for item in self._lines:
                yield _as_bytes(item)

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()


def _as_bytes(item: bytes | str | dict) -> bytes:
    if isinstance(item, bytes):
        return item.rstrip(b"\r\n")
    if isinstance(item, str):
        return item.rstrip("\r\n").encode()
    return msgspec.json.encode(item)


def new_batch_id() -> str:
    return "batch_" + secrets.token_hex(12)


class BatchClient:
    """Bulk jobs over a `Producer` (which it uses to enqueue and to cancel)."""

    def __init__(self, producer: Producer, *, chunk_lines: int = CHUNK_LINES,
                 max_queued: int = MAX_QUEUED):
        self.producer = producer
        self.redis = producer.redis
        self.settings: Settings = producer.settings
        self.chunk_lines = chunk_lines
        self.max_queued = max_queued
        self._seen = self.redis.register_script(lua("agentfleet.producer", "batch_seen"))

    @classmethod
    def from_url(cls, url: str | None = None, *, settings: Settings | None = None,
                 **kwargs) -> BatchClient:
        return cls(Producer.from_url(url, settings=settings), **kwargs)

    async def __aenter__(self) -> BatchClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.producer.close()

    # ---- submitting ------------------------------------------------------------------

    async def submit(self, source: str | os.PathLike | Iterable[bytes | str | dict], *,
                     batch_id: str | None = None, model_map: dict[str, str] | str | None = None,
                     skip_invalid: bool = False, completion_window: str = "24h",
                     endpoint: str | None = None, input_name: str = "",
                     tenant: str = "default") -> SubmitReport:
        """Validate every line of `source`, then queue its requests as one bulk job.

        `source` is a path, or an iterable of lines (bytes, str or already-decoded dicts).
        Raises `InvalidBatchFileError` (line numbers and reasons) before anything is queued
        when a line is invalid, unless `skip_invalid`; `BatchError` when `batch_id` holds
        another file or a finished job.  Safe to call again with the same batch id and file:
        what is already queued is not queued twice.  `tenant`: whose job it is (its tasks run
        in that tenant's share; its quotas hold the job back, never refuse it halfway).
        """
        check_tenant_name(tenant)
        batch_id = batch_id or new_batch_id()
        if not valid_batch_id(batch_id):
            raise ValidationError("batch_id", f"{batch_id!r}: letters, digits, '_' and '-', 64 "
                                  "characters at most", value=batch_id)
        mapping = parse_model_map(model_map)
        window_s = parse_window(completion_window)
        meta = await self._hgetall(keys.batch_meta(batch_id))
        stored = meta.get("status") if meta else None
        resumed = stored not in (None, FAILED)  # a refused file's id may be used again
        queued_before = resumed and stored != VALIDATING  # tasks of it may be queued
        if resumed:
            if stored in FINAL or stored in (FINALIZING, CANCELLING):
                raise BatchError(f"batch {batch_id} is already {stored}; choose another id")
            # The deadline of every task stays the one of the first call.
            created_at = float(meta["created_at"])
            window_s = float(meta["completion_window_s"])
        else:
            created_at = time.time()
            await self._create(batch_id, created_at, completion_window, window_s,
                               input_name or _Source.name_of(source), tenant)
        ctx = LineContext(batch_id=batch_id, endpoint=endpoint, deadline=created_at + window_s,
                          settings=self.settings, model_map=mapping,
                          tenant=meta.get("tenant", tenant) if resumed else tenant)
        seen_key = keys.batch_seen(batch_id, secrets.token_hex(4))
        src = _Source(source)
        try:
            t0 = time.monotonic()
            scan = await self._validate_pass(src, ctx, seen_key)
            validate_s = time.monotonic() - t0
            fingerprint = _fingerprint(src.sha256.hexdigest(), mapping, ctx.endpoint)
            if queued_before and meta.get("fingerprint") != fingerprint:
                raise BatchError(f"batch {batch_id} holds another file (or model map); submit "
                                 "this one under another batch id")
            if scan.invalid and not skip_invalid or not scan.total:
                await self._refuse(batch_id, scan, queued_before, seen_key)
            await self._start(batch_id, scan, ctx, fingerprint, created_at + window_s)
            t0 = time.monotonic()
            await self._submit_pass(src, ctx, scan, seen_key)
            submit_s = time.monotonic() - t0
        finally:
            src.close()
        return SubmitReport(batch_id=batch_id, endpoint=ctx.endpoint or "", total=scan.total,
                            models=scan.models, invalid=scan.invalid, errors=scan.errors,
                            resumed=resumed, validate_s=validate_s, submit_s=submit_s)

    async def _create(self, batch_id: str, created_at: float, window: str, window_s: float,
                      name: str, tenant: str) -> None:
        key = keys.batch_meta(batch_id)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(key)  # a record of a refused file under the same id
                pipe.hset(key, mapping={
                    "id": batch_id, "status": VALIDATING, "created_at": repr(created_at),
                    "completion_window": window, "completion_window_s": repr(window_s),
                    "input_file": name, "tenant": tenant})
                pipe.expire(key, int(window_s) + self.settings.result_ttl_s)
                await pipe.execute()
            # Apart: the index is another key's slot on a cluster (list_batches drops an
            # entry whose record is gone, so a crash in between leaves no stale entry).
            await self.redis.zadd(keys.batch_index(), {batch_id: created_at})
        except RedisError as exc:
            raise BrokerError(f"creating batch {batch_id} failed: {exc}") from exc

    async def _validate_pass(self, src: _Source, ctx: LineContext, seen_key: str) -> _Scan:
        """Check every line; count the valid ones per model; find repeated custom ids."""
        scan = _Scan()
        ttl = self.settings.result_ttl_s
        chunk: list[tuple[int, str, str]] = []  # (line, custom id, model) of valid lines
        pending: tuple[asyncio.Future, list] | None = None
        for line_no, raw in enumerate(src.first_pass(), 1):
            if not raw.strip():
                continue
            try:
                _, task = parse_line(raw, ctx)
            except LineError as exc:
                scan.refuse(line_no, exc.reason)
                continue
            chunk.append((line_no, task.metadata["custom_id"], task.model))
            if len(chunk) >= self.chunk_lines:
                pending = await self._check_chunk(scan, seen_key, ttl, chunk, pending)
                chunk = []
        if chunk:
            pending = await self._check_chunk(scan, seen_key, ttl, chunk, pending)
        if pending is not None:
            await self._count_chunk(scan, *pending)
        scan.errors.sort()
        return scan

    async def _check_chunk(self, scan: _Scan, seen_key: str, ttl: int, chunk: list,
                           pending: tuple | None) -> tuple:
        """Send this chunk's custom ids; meanwhile count the previous chunk's answer."""
        args: list = [ttl]
        for line_no, custom_id, _ in chunk:
            args += (custom_id, line_no)
        fut = asyncio.ensure_future(self._seen(keys=[seen_key], args=args))
        if pending is not None:
            await self._count_chunk(scan, *pending)
        return fut, chunk

    @staticmethod
    async def _count_chunk(scan: _Scan, fut: asyncio.Future, chunk: list) -> None:
        try:
            dups = await fut
        except RedisError as exc:
            raise BrokerError(f"checking custom ids failed: {exc}") from exc
        repeated = set()
        for j in range(0, len(dups), 2):
            index, first = int(dups[j]), int(dups[j + 1])
            line_no, custom_id, _ = chunk[index]
            repeated.add(index)
            scan.duplicates += 1
            scan.refuse(line_no, f"custom_id: {custom_id!r} repeats line {first}")
        models = scan.models
        for index, (_, _, model) in enumerate(chunk):
            if index not in repeated:
                models[model] = models.get(model, 0) + 1

    async def _refuse(self, batch_id: str, scan: _Scan, queued_before: bool,
                      seen_key: str) -> None:
        """Mark the job failed (unless an earlier call queued its tasks) and raise."""
        message = (f"batch {batch_id}: {scan.invalid} invalid lines; nothing was queued"
                   if scan.invalid else f"batch {batch_id}: no request lines; nothing was queued")
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.unlink(seen_key)
                if not queued_before:
                    pipe.hset(keys.batch_meta(batch_id), mapping={
                        "status": FAILED, "failed_at": repr(time.time()),
                        "invalid": scan.invalid,
                        "errors": json.dumps(scan.errors[:MAX_STORED_ERRORS])})
                await pipe.execute()
        except RedisError as exc:
            raise BrokerError(f"recording batch {batch_id} failed: {exc}") from exc
        raise InvalidBatchFileError(message, scan.errors, scan.invalid)

    async def _start(self, batch_id: str, scan: _Scan, ctx: LineContext, fingerprint: str,
                     expires_at: float) -> None:
        key = keys.batch_meta(batch_id)
        fields: dict[str, object] = {
            "status": IN_PROGRESS, "endpoint": ctx.endpoint or "", "fingerprint": fingerprint,
            "expires_at": repr(expires_at), "total": scan.total, "invalid": scan.invalid,
            "models": ",".join(sorted(scan.models)),
            "errors": json.dumps(scan.errors[:MAX_STORED_ERRORS]),
        }
        fields.update({f"total:{m}": n for m, n in scan.models.items()})
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(key, mapping=fields)
                pipe.hsetnx(key, "in_progress_at", repr(time.time()))
                await pipe.execute()
        except RedisError as exc:
            raise BrokerError(f"recording batch {batch_id} failed: {exc}") from exc

    async def _submit_pass(self, src: _Source, ctx: LineContext, scan: _Scan,
                           seen_key: str) -> None:
        """Enqueue the valid lines in chunks, one chunk in flight while the next is read."""
        meta_key = keys.batch_meta(ctx.batch_id)
        lanes = [keys.bulk_stream(m) for m in scan.models]
        dedupe_key = seen_key if scan.duplicates else None
        sent = 0
        inflight: asyncio.Future | None = None

        async def flush(chunk: list[tuple[int, Task]]) -> None:
            nonlocal inflight, sent
            if inflight is not None:  # backpressure: one chunk in flight at most
                sent += await inflight
                await self._progress(meta_key, sent, lanes)
            inflight = asyncio.ensure_future(self._send(chunk, dedupe_key)) if chunk else None

        # submit_many validates every task: check lines here only where some are to be skipped
        check = bool(scan.invalid)
        chunk: list[tuple[int, Task]] = []
        try:
            for line_no, raw in enumerate(src.second_pass(), 1):
                if not raw.strip():
                    continue
                try:
                    _, task = parse_line(raw, ctx, check=check)
                except LineError:
                    continue  # refused in the validation pass (skip_invalid)
                chunk.append((line_no, task))
                if len(chunk) >= self.chunk_lines:
                    await flush(chunk)
                    chunk = []
            await flush(chunk)
            await flush([])
        finally:
            if inflight is not None:
                inflight.cancel()
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hset(meta_key, mapping={"enqueued": sent, "submitted_at": repr(time.time())})
                pipe.unlink(seen_key)
                await pipe.execute()
        except RedisError as exc:
            raise BrokerError(f"recording batch {ctx.batch_id} failed: {exc}") from exc

    async def _send(self, chunk: list[tuple[int, Task]], seen_key: str | None) -> int:
        tasks = [task for _, task in chunk]
        if seen_key is not None:  # a repeated custom id goes in from its first line only
            try:
                firsts = await self.redis.hmget(seen_key, [t.metadata["custom_id"]
                                                           for t in tasks])
            except RedisError as exc:
                raise BrokerError(f"checking custom ids failed: {exc}") from exc
            tasks = [task for (line_no, task), first in zip(chunk, firsts, strict=True)
                     if first is not None and int(first) == line_no]
        await self.producer.submit_many(tasks, reply=False, on_quota="wait")  # held back, never refused
        return len(tasks)

    async def _progress(self, meta_key: str, sent: int, lanes: list[str]) -> None:
        """Record how far the submit pass got; wait while a bulk lane is over max_queued."""
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hset(meta_key, "enqueued", sent)
                for lane in lanes:
                    pipe.xlen(lane)
                _, *lengths = await pipe.execute()
            while max(lengths, default=0) > self.max_queued:
                await asyncio.sleep(0.5)
                async with self.redis.pipeline(transaction=False) as pipe:
                    for lane in lanes:
                        pipe.xlen(lane)
                    lengths = await pipe.execute()
        except RedisError as exc:
            raise BrokerError(f"recording batch progress failed: {exc}") from exc

    # ---- status ----------------------------------------------------------------------

    async def status(self, batch_id: str) -> BatchStatus:
        """The job's status: O(models) reads, never one per request.

        The first call that finds every request finished finalizes the job.
        """
        meta = await self._meta(batch_id)
        stored = meta.get("status", VALIDATING)
        models = [m for m in meta.get("models", "").split(",") if m]
        if stored in FINAL or stored in (VALIDATING, FAILED) or not models:
            counts = json.loads(meta.get("counts", "{}"))
            return _status(meta, stored, counts.get("by_status", {}),
                           counts.get("done", {}), finished=stored in FINAL)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for model in models:
                    pipe.hgetall(keys.batch_counts(model, batch_id))
                per_model = await pipe.execute()
        except RedisError as exc:
            raise BrokerError(f"reading batch {batch_id} failed: {exc}") from exc
        by_status: dict[str, int] = {}
        done: dict[str, int] = {}
        for model, counts in zip(models, per_model, strict=True):
            n = 0
            for field, value in counts.items():
                name = field.decode()
                by_status[name] = by_status.get(name, 0) + int(value)
                n += int(value)
            done[model] = n
        total = int(meta.get("total", 0))
        if sum(done.values()) >= total:
            return await self._finalize(batch_id, meta, by_status, done)
        if meta.get("cancelling_at"):
            derived = CANCELLING
        elif time.time() >= float(meta.get("expires_at", "inf")):
            derived = EXPIRED  # workers turn what is left into expired results as they read it
        else:
            derived = stored if stored == FINALIZING else IN_PROGRESS
        return _status(meta, derived, by_status, done, finished=False)

    async def _finalize(self, batch_id: str, meta: dict[str, str], by_status: dict[str, int],
                        done: dict[str, int]) -> BatchStatus:
        """Every request is accounted for: record the final counts, set the retention of the
        job's keys, and settle its status.  Idempotent: a finalizer that dies part way is
        repeated by the next status call."""
        key = keys.batch_meta(batch_id)
        if meta.get("cancelling_at"):
            final = CANCELLED
        elif by_status.get(Status.EXPIRED.value):
            final = EXPIRED
        else:
            final = COMPLETED
        ttl = self.settings.result_ttl_s
        now = repr(time.time())
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hsetnx(key, "finalizing_at", now)
                pipe.hset(key, "status", FINALIZING)
                await pipe.execute()
            async with self.redis.pipeline(transaction=False) as pipe:
                for model in done:
                    pipe.expire(keys.batch_output(model, batch_id), ttl)
                    pipe.expire(keys.batch_counts(model, batch_id), ttl)
                pipe.hset(key, mapping={
                    "status": final,
                    "counts": json.dumps({"by_status": by_status, "done": done})})
                pipe.hsetnx(key, f"{final}_at", now)
                pipe.expire(key, ttl)
                await pipe.execute()
        except RedisError as exc:
            raise BrokerError(f"finalizing batch {batch_id} failed: {exc}") from exc
        return await self.status(batch_id)

    async def wait(self, batch_id: str, *, timeout_s: float | None = None, poll_s: float = 0.5,
                   on_progress: Callable[[BatchStatus], None] | None = None) -> BatchStatus:
        """Poll the status (O(models) a poll) until the job settles; `TimeoutError` after
        `timeout_s`.  `on_progress` sees every status read."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        down = False
        while True:
            try:
                st = await self.status(batch_id)
            except BrokerError as exc:  # a server restart: ride it out until the deadline
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                if not down:
                    log.warning("batch %s: %s; retrying", batch_id, exc)
                down = True
                await asyncio.sleep(poll_s)
                continue
            down = False
            if on_progress is not None:
                on_progress(st)
            if st.settled:
                return st
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"batch {batch_id} is still {st.status} after {timeout_s}s "
                                   f"({st.done}/{st.total} finished)")
            await asyncio.sleep(poll_s)

    async def cancel(self, batch_id: str) -> BatchStatus:
        """Cancel the job: its queued requests finish as `cancelled` without running; those
        already in an engine finish normally.  The job becomes `cancelled` once every request
        is accounted for."""
        meta = await self._meta(batch_id)
        if meta.get("status") in FINAL or meta.get("status") == FAILED:
            return await self.status(batch_id)
        key = keys.batch_meta(batch_id)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hsetnx(key, "cancelling_at", repr(time.time()))
                pipe.hset(key, "status", CANCELLING)
                await pipe.execute()
        except RedisError as exc:
            raise BrokerError(f"cancelling batch {batch_id} failed: {exc}") from exc
        models = [m for m in meta.get("models", "").split(",") if m] or list(self.settings.models)
        for model in models:
            await self.producer.cancel("batch:" + batch_id, model)
        return await self.status(batch_id)

    async def list_batches(self, count: int = 20) -> list[BatchStatus]:
        """The newest jobs, newest first."""
        try:
            ids = await self.redis.zrevrange(keys.batch_index(), 0, count - 1)
        except RedisError as exc:
            raise BrokerError(f"listing batches failed: {exc}") from exc
        found = []
        for raw in ids:
            try:
                found.append(await self.status(raw.decode()))
            except BatchError:  # its record expired: drop it from the index
                try:
                    await self.redis.zrem(keys.batch_index(), raw)
                except RedisError as exc:
                    raise BrokerError(f"listing batches failed: {exc}") from exc
        return found

    # ---- results ---------------------------------------------------------------------

    async def results(self, batch_id: str, *, follow: bool = True,
                      block_ms: int = 1000) -> AsyncIterator[Result]:
        """Yield the job's results as they complete (XREAD BLOCK on its output streams).

        With `follow`, ends once every request has a result or the job has settled; without,
        ends at the end of what is there now.
        """
        meta = await self._meta(batch_id)
        models = [m for m in meta.get("models", "").split(",") if m]
        total = int(meta.get("total", 0))
        streams = {keys.batch_output(m, batch_id): "0-0" for m in models}
        seen = 0
        while streams and seen < total:
            try:
                reply = await self.redis.xread(streams, count=PAGE,
                                               block=block_ms if follow else None)
            except RedisError as exc:
                raise BrokerError(f"reading results of {batch_id} failed: {exc}") from exc
            if not reply:
                if not follow or (await self.status(batch_id)).settled:
                    try:  # one last read: results written just before the job settled
                        reply = await self.redis.xread(streams, count=PAGE)
                    except RedisError as exc:
                        raise BrokerError(f"reading results of {batch_id} failed: {exc}") \
                            from exc
                    if not reply:
                        return
                else:
                    continue
            for stream, entries in reply:
                for _, fields in entries:
                    seen += 1
                    yield decode_result(fields[b"r"])
                streams[stream.decode()] = entries[-1][0]

    async def output_lines(self, batch_id: str) -> AsyncIterator[tuple[bool, bytes]]:
        """Every result there is now as an OpenAI batch output line, page by page (XRANGE):
        (True, line) for the output file, (False, line) for the error file."""
        meta = await self._meta(batch_id)
        endpoint = meta.get("endpoint", "")
        for model in [m for m in meta.get("models", "").split(",") if m]:
            stream = keys.batch_output(model, batch_id)
            start = "-"
            while True:
                try:
                    page = await self.redis.xrange(stream, min=start, max="+", count=PAGE)
                except RedisError as exc:
                    raise BrokerError(f"reading results of {batch_id} failed: {exc}") from exc
                for _, fields in page:
                    yield output_line(decode_result(fields[b"r"]), endpoint)
                if len(page) < PAGE:
                    break
                start = "(" + page[-1][0].decode()

    async def write_results(self, batch_id: str, output_path: str | os.PathLike,
                            errors_path: str | os.PathLike | None = None) -> ResultsReport:
        """Write the output file (and the error file, if named; else errors go to the output
        file too, as vLLM's run-batch does).  Flat memory: one page of results at a time."""
        st = await self.status(batch_id)
        report = ResultsReport()
        with open(output_path, "wb") as out, \
                (open(errors_path, "wb") if errors_path else _Same(out)) as err:
            async for ok, line in self.output_lines(batch_id):
                if ok:
                    out.write(line + b"\n")
                    report.output += 1
                else:
                    err.write(line + b"\n")
                    report.errors += 1
        report.missing = max(st.total - report.output - report.errors, 0)
        return report

    # ---- helpers ---------------------------------------------------------------------

    async def _meta(self, batch_id: str) -> dict[str, str]:
        meta = await self._hgetall(keys.batch_meta(batch_id))
        if not meta:
            raise BatchError(f"no batch {batch_id!r} (unknown, or its record has expired)")
        return meta

    async def _hgetall(self, key: str) -> dict[str, str]:
        try:
            raw = await self.redis.hgetall(key)
        except RedisError as exc:
            raise BrokerError(f"reading {key} failed: {exc}") from exc
        return {k.decode(): v.decode() for k, v in raw.items()}


class _Same:
    """The output file standing in for the error file (a context manager that closes nothing)."""

    def __init__(self, f):
        self.write = f.write

    def __enter__(self) -> _Same:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _fingerprint(sha256: str, model_map: dict[str, str], endpoint: str | None) -> str:
    mapping = ",".join(f"{k}={v}" for k, v in sorted(model_map.items()))
    return hashlib.sha256(f"{sha256}\n{mapping}\n{endpoint}".encode()).hexdigest()


def _status(meta: dict[str, str], status: str, by_status: dict[str, int],
            done: dict[str, int], *, finished: bool) -> BatchStatus:
    def at(name: str) -> float | None:
        value = meta.get(name)
        return float(value) if value else None

    models = [m for m in meta.get("models", "").split(",") if m]
    return BatchStatus(
        id=meta.get("id", ""), status=status, endpoint=meta.get("endpoint", ""),
        input_file=meta.get("input_file", ""),
        completion_window=meta.get("completion_window", ""),
        total=int(meta.get("total", 0)), by_status=by_status,
        models={m: (int(meta.get(f"total:{m}", 0)), done.get(m, 0)) for m in models},
        enqueued=int(meta.get("enqueued", 0)), invalid=int(meta.get("invalid", 0)),
        errors=[tuple(e) for e in json.loads(meta.get("errors", "[]"))],
        finished=finished, created_at=float(meta.get("created_at", 0)),
        in_progress_at=at("in_progress_at"), expires_at=at("expires_at"),
        finalizing_at=at("finalizing_at"), completed_at=at("completed_at"),
        failed_at=at("failed_at"), expired_at=at("expired_at"),
        cancelling_at=at("cancelling_at"), cancelled_at=at("cancelled_at"),
    )


__all__ = ["BatchClient", "BatchStatus", "ResultsReport", "SubmitReport", "custom_id_of",
           "new_batch_id"]
