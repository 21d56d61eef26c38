"""`agentfleet report --since 24h`: SLOs, KPIs and breakdowns of a window, as text, HTML or
JSON.

The figures come from the aggregates the workers keep in Redis (workers/kpi.py): whole hours
from the hour hashes (breakdowns) and the series hashes (plots), the minutes at the window's
edges from the minute hashes, all read with pipelines of HGETALL.  A day costs 48 hash reads
plus the edges, whatever the tenants; hours that older workers wrote only as minutes are read
as minutes.  No Prometheus is needed.

What a report holds (`Report`, the JSON form; `ops/report_render.py` draws it):
  SLOs per model and lane class: interactive tasks on availability (succeeded / ended, the
  cancelled left out), time to first token (from enqueue) and end to end; bulk-job tasks on
  finishing successfully within their job's completion window.  Attainment, and the error
  budget left (1 - bad / allowed bad; negative: overspent).
  Series (plots): tasks and tokens, p50/p99 end to end and to first token, errors by code,
  queue depth and wait, one point per minute (a few minutes when the window is long: at most
  720 points; hours past 36 h).
  Breakdowns by model, version, lane and tenant (the top tenants by tasks, then "(other)").
  The worst minutes, the top error codes with an example correlation id each, KPIs (tokens
  per engine-hour, busy share, tokens per task, cost at a given price per GPU-hour) and the
  same window before this one.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Generator, Iterable, Sequence
from pathlib import Path

import msgspec
import redis

from agentfleet.schemas import keys
from agentfleet.workers.kpi import LANES, parse_field, split_lane
from agentfleet.workers.kpi import LATENCY_BUCKETS_S

_CHUNK = 2000  # HGETALLs per pipeline round trip
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_POINTS = 720  # per plotted series: a 24-hour window plots 2-minute points
MINUTE_SERIES_MAX_S = 36 * 3600  # longer windows plot hours
TENANT_MINUTES_MAX_S = 6 * 3600  # a tenant's view reads minutes up to this, then hours
TOP_TENANTS = 20  # per model and lane in the breakdown; the rest are summed as "(other)"
_NB = len(LATENCY_BUCKETS_S) + 1
OTHER = "(other)"
ALL = "(all)"


def parse_duration(text: str) -> float:
    """Seconds of "90s", "15m", "24h", "7d", "2w" (a bare number is seconds)."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration like 90s, 15m, 24h or 7d")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


class SloPolicy(msgspec.Struct, kw_only=True, frozen=True):
    """The objectives a report judges against (`agentfleet report --ttft-slo-s ...`)."""

    availability: float = 0.995  # interactive: succeeded / (ended - cancelled)
    ttft_s: float = 2.5  # interactive: first token within this, from enqueue
    ttft_objective: float = 0.99
    e2e_s: float = 30.0  # interactive: result written within this, from enqueue
    e2e_objective: float = 0.99
    bulk_objective: float = 0.99  # bulk jobs: succeeded within the job's completion window


# ---- the figures of a group of tasks -------------------------------------------------------

class Row(msgspec.Struct, kw_only=True):
    """The aggregates of one model, version, lane and tenant (or of a sum of them)."""

    model: str
    lane: str
    tenant: str
    version: str = ""
    statuses: dict[str, int] = {}
    error_codes: dict[str, int] = {}
    buckets: list[int] = msgspec.field(default_factory=lambda: [0] * _NB)  # end to end
    ttft_buckets: list[int] = msgspec.field(default_factory=lambda: [0] * _NB)
    wait_buckets: list[int] = msgspec.field(default_factory=lambda: [0] * _NB)
    latency_sum_s: float = 0.0
    wait_sum_s: float = 0.0
    engine_s: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    within_window: int = 0  # bulk: succeeded within the job's completion window
    detailed: bool = False  # written by workers that record t, q, w, g and d

    @property
    def ended(self) -> int:
        return sum(self.statuses.values())

    @property
    def succeeded(self) -> int:
        return self.statuses.get("succeeded", 0)

    @property
    def valid(self) -> int:
        """Tasks an SLO counts: those that ended, less the cancelled (the producer's choice)."""
        return self.ended - self.statuses.get("cancelled", 0)

    @property
    def failed(self) -> int:
        """Ended without an answer and not cancelled: failed, expired, dead-lettered."""
        return self.valid - self.succeeded

    @property
    def success_rate(self) -> float | None:
        return self.succeeded / self.valid if self.valid else None

    @property
    def timed(self) -> int:
        return sum(self.buckets)

    @property
    def mean_s(self) -> float | None:
        return self.latency_sum_s / self.timed if self.timed else None

    @property
    def within_slo(self) -> float | None:
        """Share of timed tasks within 30 s end to end (the default SLO bound)."""
        return share_within(self.buckets, SloPolicy().e2e_s)

    def quantile(self, q: float) -> float | None:
        return bucket_quantile(q, self.buckets)

    def add(self, other: Row) -> None:
        for status, n in other.statuses.items():
            self.statuses[status] = self.statuses.get(status, 0) + n
        for code, n in other.error_codes.items():
            self.error_codes[code] = self.error_codes.get(code, 0) + n
        for mine, theirs in ((self.buckets, other.buckets), (self.ttft_buckets,
                             other.ttft_buckets), (self.wait_buckets, other.wait_buckets)):
            for i, n in enumerate(theirs):
                if n:
                    mine[i] += n
        self.latency_sum_s += other.latency_sum_s
        self.wait_sum_s += other.wait_sum_s
        self.engine_s += other.engine_s
        self.prompt_tokens += other.prompt_tokens
        self.output_tokens += other.output_tokens
        self.within_window += other.within_window
        self.detailed = self.detailed or other.detailed

    def take(self, kind: str, detail: str, raw: bytes | str) -> None:
        """Add one hash field's value (kinds: workers/kpi.py)."""
        if kind == "s":
            self.statuses[detail] = self.statuses.get(detail, 0) + int(raw)
        elif kind == "b":
            i = int(detail)
            if i < _NB:
                self.buckets[i] += int(raw)
        elif kind == "t" or kind == "q":
            i = int(detail)
            if i < _NB:
                (self.ttft_buckets if kind == "t" else self.wait_buckets)[i] += int(raw)
            self.detailed = True
        elif kind == "e":
            self.error_codes[detail] = self.error_codes.get(detail, 0) + int(raw)
        elif kind == "l":
            self.latency_sum_s += float(raw)
        elif kind == "p":
            self.prompt_tokens += int(raw)
        elif kind == "o":
            self.output_tokens += int(raw)
        elif kind == "w":
            self.wait_sum_s += float(raw)
            self.detailed = True
        elif kind == "g":
            self.engine_s += float(raw)
            self.detailed = True
        elif kind == "d":
            self.within_window += int(raw)
            self.detailed = True


def bucket_quantile(q: float, buckets: Sequence[int]) -> float | None:
    """The q-quantile of counts per latency bucket, linear inside a bucket (0 below the first;
    the last bound for values above it, as histogram_quantile does)."""
    total = sum(buckets)
    if not total:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(buckets):
        if n and seen + n >= rank:
            if i == len(LATENCY_BUCKETS_S):
                return LATENCY_BUCKETS_S[-1]
            low = LATENCY_BUCKETS_S[i - 1] if i else 0.0
            return low + (LATENCY_BUCKETS_S[i] - low) * (rank - seen) / n
        seen += n
    return LATENCY_BUCKETS_S[-1]


def count_within(buckets: Sequence[int], bound_s: float) -> float:
    """Tasks at or below `bound_s`, linear inside the bucket that holds the bound."""
    below = 0.0
    low = 0.0
    for i, n in enumerate(buckets):
        high = LATENCY_BUCKETS_S[i] if i < len(LATENCY_BUCKETS_S) else math.inf
        if high <= bound_s:
            below += n
        elif low < bound_s:
            if high != math.inf:
                below += n * (bound_s - low) / (high - low)
            break
        else:
            break
        low = high
    return below


def share_within(buckets: Sequence[int], bound_s: float) -> float | None:
    total = sum(buckets)
    return count_within(buckets, bound_s) / total if total else None


class Slot(msgspec.Struct, kw_only=True):
    """One point of a model's series: its lanes' figures and the fleet's figures."""

    at: float
    lanes: dict[str, Row] = {}
    depth: dict[str, int] = {}  # lane -> the last depth sampled in the slot
    up_s: float = 0.0
    busy_s: float = 0.0

    def lane(self, model: str, lane: str) -> Row:
        row = self.lanes.get(lane)
        if row is None:
            row = self.lanes[lane] = Row(model=model, lane=lane, tenant=ALL)
        return row


class Window(msgspec.Struct, kw_only=True):
    """What the aggregates say about a window."""

    since: float
    until: float
    models: list[str]
    rows: list[Row]  # per (model, version, lane, tenant)
    slots: dict[str, dict[int, Slot]] = {}  # model -> slot start -> slot
    resolution_s: int = 60
    examples: dict[str, dict[str, str]] = {}  # model -> error code -> a correlation id
    capacity: dict[str, tuple[float, float]] = {}  # model -> (engine up s, busy s)
    tenants: list[str] | None = None  # the view's tenants; None: every tenant

    def model_totals(self) -> list[Row]:
        """One row per (model, lane), every version and tenant summed."""
        return total_rows(self.rows)


def total_rows(rows: Iterable[Row], *, by_lane: bool = True, by_version: bool = False,
               by_tenant: bool = False) -> list[Row]:
    """Rows summed per model (and lane, version, tenant when asked); "(all)" elsewhere."""
    totals: dict[tuple[str, str, str, str], Row] = {}
    for row in rows:
        k = (row.model, row.lane if by_lane else ALL, row.version if by_version else ALL,
             row.tenant if by_tenant else ALL)
        total = totals.get(k)
        if total is None:
            total = totals[k] = Row(model=k[0], lane=k[1], version=k[2], tenant=k[3])
        total.add(row)
    return [totals[k] for k in sorted(totals)]


# ---- reading Redis -------------------------------------------------------------------------

_SKIP = object()


class _Reader:
    """Parses hash fields into rows and slots; field names repeat across hashes, so each
    distinct name is parsed once."""

    def __init__(self, tenants: set[str] | None):
        self.tenants = tenants
        self.rows: dict[tuple[str, str, str, str], Row] = {}
        self.slots: dict[str, dict[int, Slot]] = {}
        self.examples: dict[str, dict[str, str]] = {}
        self.capacity: dict[str, list[float]] = {}
        self._parsed: dict[bytes, tuple | None] = {}
        self._series: dict[bytes, tuple | None] = {}

    def _parse(self, name: bytes) -> tuple | None:
        text = name.decode(errors="replace")
        if text[:2] in ("x:", "c:", "z:"):
            return (text[0], text[2:], "", "", "")
        parsed = parse_field(text)
        if parsed is None:
            return None
        kind, detail, lane_part, tenant = parsed
        if self.tenants is not None and tenant not in self.tenants:
            return None
        lane, version = split_lane(lane_part)
        return kind, detail, lane, version, tenant

    def slot(self, model: str, at: int) -> Slot:
        slots = self.slots.setdefault(model, {})
        found = slots.get(at)
        if found is None:
            found = slots[at] = Slot(at=at)
        return found

    def detail(self, model: str, fields: dict, slot_at: int | None) -> None:
        """A minute or hour hash: into the rows, and into the slot at `slot_at` if given."""
        cache = self._parsed
        rows = self.rows
        slot = self.slot(model, slot_at) if slot_at is not None and fields else None
        fleet = self.tenants is None
        for name, raw in fields.items():
            p = cache.get(name, _SKIP)
            if p is _SKIP:
                p = cache[name] = self._parse(name)
            if p is None:
                continue
            kind, detail, lane, version, tenant = p
            if kind in "xcz":
                if not fleet:
                    continue
                if kind == "x":
                    self.examples.setdefault(model, {})[detail] = raw.decode(errors="replace")
                elif kind == "c":
                    cap = self.capacity.setdefault(model, [0.0, 0.0])
                    cap[detail == "busy"] += float(raw)
                    if slot is not None:
                        if detail == "busy":
                            slot.busy_s += float(raw)
                        else:
                            slot.up_s += float(raw)
                elif slot is not None and detail.startswith("depth:"):
                    slot.depth[detail[6:]] = int(raw)
                continue
            key = (model, version, lane, tenant)
            row = rows.get(key)
            if row is None:
                row = rows[key] = Row(model=model, lane=lane, tenant=tenant, version=version)
            row.take(kind, detail, raw)
            if slot is not None:
                slot.lane(model, lane).take(kind, detail, raw)

    def series(self, model: str, hour: int, fields: dict, bin_of) -> None:
        """A series hash: every minute of the hour into its slot."""
        cache = self._series
        for name, raw in fields.items():
            p = cache.get(name, _SKIP)
            if p is _SKIP:
                offset, _, inner = name.partition(b"/")
                parsed = self._parse(inner) if offset.isdigit() else None
                p = cache[name] = None if parsed is None else (int(offset) * 60, *parsed[:3])
            if p is None:
                continue
            offset, kind, detail, lane = p
            slot = self.slot(model, bin_of(hour + offset))
            if kind == "c":
                if detail == "busy":
                    slot.busy_s += float(raw)
                else:
                    slot.up_s += float(raw)
            elif kind == "z":
                if detail.startswith("depth:"):
                    slot.depth[detail[6:]] = int(raw)
            elif kind != "x":
                slot.lane(model, lane).take(kind, detail, raw)


def _loader(models: Sequence[str], since: float, until: float, *, tenants: set[str] | None,
            with_series: bool) -> Generator[list[str], list[dict], Window]:
    """The reads of a window as a generator: it yields lists of hash keys and is sent their
    HGETALL replies (one or two rounds), so the sync and the async loader share it."""
    first = int(since // 60) * 60
    end = int(until // 60) * 60 + 60  # the current minute included
    span = end - first
    minute_res = span <= MINUTE_SERIES_MAX_S and (tenants is None or span <= TENANT_MINUTES_MAX_S)
    if minute_res:
        step = math.ceil(span / 60 / MAX_POINTS)
        resolution = 60 * step
    else:
        resolution = 3600
    reader = _Reader(tenants)
    all_minutes = tenants is not None and minute_res  # a tenant's short view: minutes only
    hours = [] if all_minutes else list(range(math.ceil(first / 3600) * 3600, end - 3599, 3600))
    covered = set(hours)
    minutes = [m for m in range(first, end, 60) if m - m % 3600 not in covered]
    series_too = with_series and minute_res and tenants is None

    def bin_of(at: int) -> int:
        return at - at % resolution if resolution == 3600 else \
            first + (at - first) // resolution * resolution

    wanted: list[str] = []
    for model in models:
        for hour in hours:
            wanted.append(keys.kpi_hour_key(model, hour))
            if series_too:
                wanted.append(keys.kpi_series_key(model, hour))
        wanted.extend(keys.kpi_key(model, m) for m in minutes)
    replies = yield wanted
    fallback: list[tuple[str, int]] = []
    it = iter(replies)
    for model in models:
        for hour in hours:
            detail = next(it)
            series = next(it) if series_too else {}
            if not detail and not series:
                fallback.append((model, hour))  # none, or written as minutes only
                continue
            reader.detail(model, detail, None if series_too or not with_series else hour)
            if series:
                reader.series(model, hour, series, bin_of)
        for m in minutes:
            reader.detail(model, next(it), bin_of(m) if with_series else None)
    if fallback:
        replies = yield [keys.kpi_key(model, hour + 60 * i) for model, hour in fallback
                         for i in range(60)]
        it = iter(replies)
        for model, hour in fallback:
            for i in range(60):
                reader.detail(model, next(it), bin_of(hour + 60 * i) if with_series else None)
    if with_series:  # every slot of the window, so that gaps show as gaps
        for model in models:
            for at in range(bin_of(first), end, resolution):
                reader.slot(model, at)
    rows = [reader.rows[k] for k in sorted(reader.rows)]
    return Window(since=first, until=until, models=list(models), rows=rows,
                  slots={m: dict(sorted(s.items())) for m, s in reader.slots.items()},
                  resolution_s=resolution, examples=reader.examples,
                  capacity={m: (c[0], c[1]) for m, c in reader.capacity.items()},
                  tenants=sorted(tenants) if tenants is not None else None)


def load_window(client: redis.Redis, models: Sequence[str], since_s: float,
                now: float | None = None, *, tenants: set[str] | None = None,
                with_series: bool = True) -> Window:
    """The aggregates of the last `since_s` seconds (whole minutes, the current one included)."""
    now = time.time() if now is None else now
    gen = _loader(models, now - since_s, now, tenants=tenants, with_series=with_series)
    try:
        wanted = next(gen)
        while True:
            wanted = gen.send(_hgetall_sync(client, wanted))
    except StopIteration as stop:
        return stop.value


async def load_window_async(client, models: Sequence[str], since_s: float,
                            now: float | None = None, *, tenants: set[str] | None = None,
                            with_series: bool = True) -> Window:
    """`load_window` on an asyncio client (the console)."""
    now = time.time() if now is None else now
    gen = _loader(models, now - since_s, now, tenants=tenants, with_series=with_series)
    try:
        wanted = next(gen)
        while True:
            replies: list[dict] = []
            for start in range(0, len(wanted), _CHUNK):
                async with client.pipeline(transaction=False) as pipe:
                    for key in wanted[start:start + _CHUNK]:
                        pipe.hgetall(key)
                    replies.extend(await pipe.execute())
            wanted = gen.send(replies)
    except StopIteration as stop:
        return stop.value


def _hgetall_sync(client: redis.Redis, wanted: list[str]) -> list[dict]:
    replies: list[dict] = []
    for start in range(0, len(wanted), _CHUNK):
        with client.pipeline(transaction=False) as pipe:
            for key in wanted[start:start + _CHUNK]:
                pipe.hgetall(key)
            replies.extend(pipe.execute())
    return replies


# ---- the report ----------------------------------------------------------------------------

class SloResult(msgspec.Struct, kw_only=True):
    model: str
    lane: str
    name: str  # availability, ttft, end_to_end, within_window
    objective: float
    bound_s: float | None
    good: float
    valid: int
    attainment: float | None
    budget_left: float | None  # 1 - bad / (allowed bad); below 0: overspent
    met: bool | None


class BreakdownRow(msgspec.Struct, kw_only=True):
    model: str
    version: str
    lane: str
    tenant: str
    ended: int
    succeeded: int
    failed: int
    expired: int
    cancelled: int
    dead_lettered: int
    success_rate: float | None
    p50_s: float | None
    p99_s: float | None
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    wait_p50_s: float | None
    within_slo: float | None  # interactive: share within the end-to-end bound; bulk: window
    prompt_tokens: int
    output_tokens: int
    total: bool = False  # a (model, lane) total row


class Kpi(msgspec.Struct, kw_only=True):
    model: str
    tasks: int
    succeeded: int
    prompt_tokens: int
    output_tokens: int
    tokens_per_task: float | None  # prompt + output per succeeded task
    output_tokens_per_task: float | None
    engine_hours: float | None  # engine up time summed over workers (one engine per GPU)
    busy_share: float | None  # share of that time with a task in flight
    output_tokens_per_engine_hour: float | None
    tasks_per_engine_hour: float | None
    cost: float | None  # engine_hours x price_per_gpu_hour, when a price is given
    cost_per_million_output_tokens: float | None
    mean_engine_s: float | None  # engine seconds per timed task


class ErrorCount(msgspec.Struct, kw_only=True):
    model: str
    code: str
    count: int
    share: float  # of the model's tasks that ended
    example_correlation_id: str = ""


class WorstSlot(msgspec.Struct, kw_only=True):
    model: str
    at: float
    ended: int
    bad: int  # failed + expired + dead-lettered + interactive over the end-to-end bound
    errors: dict[str, int]
    p99_s: float | None


class Point(msgspec.Struct, kw_only=True, array_like=True):
    """One point of a model's series (JSON: an array in this order)."""

    at: float
    interactive: int  # tasks that ended
    bulk: int
    prompt_tokens: int
    output_tokens: int
    e2e_p50_s: float | None  # interactive
    e2e_p99_s: float | None
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    wait_p50_s: float | None  # both lanes
    wait_p99_s: float | None
    depth_interactive: int | None
    depth_bulk: int | None
    errors: dict[str, int]
    busy_share: float | None


class Comparison(msgspec.Struct, kw_only=True):
    """This window against the one before it, per model and lane."""

    model: str
    lane: str
    ended: int
    ended_before: int
    success_rate: float | None
    success_rate_before: float | None
    p99_s: float | None
    p99_s_before: float | None
    ttft_p99_s: float | None
    ttft_p99_s_before: float | None
    output_tokens: int
    output_tokens_before: int


class Report(msgspec.Struct, kw_only=True):
    generated_at: float
    since: float
    until: float
    resolution_s: int
    models: list[str]
    tenants: list[str] | None  # the view's tenants; None: all
    policy: SloPolicy
    price_per_gpu_hour: float | None
    slos: list[SloResult]
    breakdown: list[BreakdownRow]
    kpis: list[Kpi]
    top_errors: list[ErrorCount]
    worst: list[WorstSlot]
    series: dict[str, list[Point]]
    previous: list[Comparison]
    has_versions: bool
    has_tenants: bool


def slos_of(total: Row, policy: SloPolicy) -> list[SloResult]:
    """The SLOs of one (model, lane) total."""
    def result(name: str, objective: float, bound: float | None, good: float,
               valid: int) -> SloResult:
        if not valid:
            return SloResult(model=total.model, lane=total.lane, name=name, objective=objective,
                             bound_s=bound, good=0, valid=0, attainment=None, budget_left=None,
                             met=None)
        attained = good / valid
        allowed = (1 - objective) * valid
        bad = valid - good
        left = 1 - bad / allowed if allowed > 0 else (1.0 if bad <= 0 else -math.inf)
        return SloResult(model=total.model, lane=total.lane, name=name, objective=objective,
                         bound_s=bound, good=good, valid=valid, attainment=attained,
                         budget_left=left, met=attained >= objective)

    if total.lane == "bulk":
        if not total.detailed:  # written before the window was recorded: no judgement
            return []
        return [result("within_window", policy.bulk_objective, None, total.within_window,
                       total.valid)]
    out = [result("availability", policy.availability, None, total.succeeded, total.valid)]
    if total.detailed:
        out.append(result("ttft", policy.ttft_objective, policy.ttft_s,
                          count_within(total.ttft_buckets, policy.ttft_s),
                          sum(total.ttft_buckets)))
    out.append(result("end_to_end", policy.e2e_objective, policy.e2e_s,
                      count_within(total.buckets, policy.e2e_s), total.timed))
    return out


def _breakdown_row(row: Row, policy: SloPolicy, total: bool = False) -> BreakdownRow:
    st = row.statuses
    if row.lane == "bulk":
        within = row.within_window / row.valid if row.valid and row.detailed else None
    else:
        within = share_within(row.buckets, policy.e2e_s)
    return BreakdownRow(
        model=row.model, version=row.version, lane=row.lane, tenant=row.tenant,
        ended=row.ended, succeeded=row.succeeded, failed=st.get("failed", 0),
        expired=st.get("expired", 0), cancelled=st.get("cancelled", 0),
        dead_lettered=st.get("dead_lettered", 0), success_rate=row.success_rate,
        p50_s=row.quantile(0.5), p99_s=row.quantile(0.99),
        ttft_p50_s=bucket_quantile(0.5, row.ttft_buckets),
        ttft_p99_s=bucket_quantile(0.99, row.ttft_buckets),
        wait_p50_s=bucket_quantile(0.5, row.wait_buckets), within_slo=within,
        prompt_tokens=row.prompt_tokens, output_tokens=row.output_tokens, total=total)


def _top_tenants(rows: list[Row]) -> list[Row]:
    """Per (model, version, lane): the TOP_TENANTS busiest tenants, the rest as "(other)"."""
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.model, row.version, row.lane), []).append(row)
    out: list[Row] = []
    for key in sorted(groups):
        members = sorted(groups[key], key=lambda r: (-r.ended, r.tenant))
        out.extend(members[:TOP_TENANTS])
        if len(members) > TOP_TENANTS:
            other = Row(model=key[0], version=key[1], lane=key[2], tenant=OTHER)
            for row in members[TOP_TENANTS:]:
                other.add(row)
            out.append(other)
    return out


def _point(slot: Slot, model: str) -> Point:
    inter = slot.lanes.get("interactive") or Row(model=model, lane="interactive", tenant=ALL)
    bulk = slot.lanes.get("bulk") or Row(model=model, lane="bulk", tenant=ALL)
    wait = [a + b for a, b in zip(inter.wait_buckets, bulk.wait_buckets)]
    errors: dict[str, int] = {}
    for row in (inter, bulk):
        for code, n in row.error_codes.items():
            errors[code] = errors.get(code, 0) + n
    return Point(
        at=slot.at, interactive=inter.ended, bulk=bulk.ended,
        prompt_tokens=inter.prompt_tokens + bulk.prompt_tokens,
        output_tokens=inter.output_tokens + bulk.output_tokens,
        e2e_p50_s=inter.quantile(0.5), e2e_p99_s=inter.quantile(0.99),
        ttft_p50_s=bucket_quantile(0.5, inter.ttft_buckets),
        ttft_p99_s=bucket_quantile(0.99, inter.ttft_buckets),
        wait_p50_s=bucket_quantile(0.5, wait), wait_p99_s=bucket_quantile(0.99, wait),
        depth_interactive=slot.depth.get("interactive"), depth_bulk=slot.depth.get("bulk"),
        errors=errors, busy_share=slot.busy_s / slot.up_s if slot.up_s else None)


def _kpi(model: str, rows: list[Row], capacity: tuple[float, float] | None,
         price: float | None) -> Kpi:
    total = Row(model=model, lane=ALL, tenant=ALL)
    for row in rows:
        total.add(row)
    up_s, busy_s = capacity if capacity else (0.0, 0.0)
    hours = up_s / 3600 if up_s else None
    ok = total.succeeded
    cost = hours * price if hours is not None and price is not None else None
    timed_engine = sum(total.ttft_buckets)  # succeeded tasks with a first token
    return Kpi(
        model=model, tasks=total.ended, succeeded=ok, prompt_tokens=total.prompt_tokens,
        output_tokens=total.output_tokens,
        tokens_per_task=(total.prompt_tokens + total.output_tokens) / ok if ok else None,
        output_tokens_per_task=total.output_tokens / ok if ok else None,
        engine_hours=hours, busy_share=busy_s / up_s if up_s else None,
        output_tokens_per_engine_hour=total.output_tokens / hours if hours else None,
        tasks_per_engine_hour=total.ended / hours if hours else None, cost=cost,
        cost_per_million_output_tokens=cost / total.output_tokens * 1e6
        if cost is not None and total.output_tokens else None,
        mean_engine_s=total.engine_s / timed_engine if timed_engine and total.engine_s
        else None)


def build_report(window: Window, previous: Window | None = None, *,
                 policy: SloPolicy | None = None,
                 price_per_gpu_hour: float | None = None) -> Report:
    """Everything a report shows, computed from the window (and the one before it)."""
    policy = policy or SloPolicy()
    totals = window.model_totals()
    slos = [s for total in totals for s in slos_of(total, policy)]
    breakdown: list[BreakdownRow] = []
    for model in window.models:
        model_rows = [r for r in window.rows if r.model == model]
        for row in _top_tenants(model_rows):
            breakdown.append(_breakdown_row(row, policy))
        for total in totals:
            if total.model == model:
                breakdown.append(_breakdown_row(total, policy, total=True))
    kpis = [_kpi(m, [r for r in window.rows if r.model == m], window.capacity.get(m),
                 price_per_gpu_hour) for m in window.models
            if any(r.model == m for r in window.rows) or m in window.capacity]
    top_errors: list[ErrorCount] = []
    for total in total_rows(window.rows, by_lane=False):
        for code, n in total.error_codes.items():
            top_errors.append(ErrorCount(
                model=total.model, code=code, count=n, share=n / total.ended if total.ended
                else 0.0, example_correlation_id=window.examples.get(total.model, {})
                .get(code, "")))
    top_errors.sort(key=lambda e: (-e.count, e.model, e.code))
    series: dict[str, list[Point]] = {}
    worst: list[WorstSlot] = []
    for model, slots in window.slots.items():
        points = series[model] = []
        for slot in slots.values():
            points.append(_point(slot, model))
            bad = 0
            ended = 0
            for row in slot.lanes.values():
                ended += row.ended
                bad += row.failed
                if row.lane == "interactive":
                    bad += round(row.timed - count_within(row.buckets, policy.e2e_s))
            if bad:
                inter = slot.lanes.get("interactive")
                worst.append(WorstSlot(model=model, at=slot.at, ended=ended, bad=bad,
                                       errors=points[-1].errors,
                                       p99_s=inter.quantile(0.99) if inter else None))
    worst.sort(key=lambda w: (-w.bad, w.at))
    comparisons: list[Comparison] = []
    if previous is not None:
        before = {(t.model, t.lane): t for t in previous.model_totals()}
        now_totals = {(t.model, t.lane): t for t in totals}
        for key in sorted(set(before) | set(now_totals)):
            a = now_totals.get(key) or Row(model=key[0], lane=key[1], tenant=ALL)
            b = before.get(key) or Row(model=key[0], lane=key[1], tenant=ALL)
            comparisons.append(Comparison(
                model=key[0], lane=key[1], ended=a.ended, ended_before=b.ended,
                success_rate=a.success_rate, success_rate_before=b.success_rate,
                p99_s=a.quantile(0.99), p99_s_before=b.quantile(0.99),
                ttft_p99_s=bucket_quantile(0.99, a.ttft_buckets),
                ttft_p99_s_before=bucket_quantile(0.99, b.ttft_buckets),
                output_tokens=a.output_tokens, output_tokens_before=b.output_tokens))
    return Report(
        generated_at=time.time(), since=window.since, until=window.until,
        resolution_s=window.resolution_s, models=list(window.models), tenants=window.tenants,
        policy=policy, price_per_gpu_hour=price_per_gpu_hour, slos=slos, breakdown=breakdown,
        kpis=kpis, top_errors=top_errors[:10], worst=worst[:5], series=series,
        previous=comparisons, has_versions=any(r.version for r in window.rows),
        has_tenants=any(r.tenant not in ("", "default") for r in window.rows))


def load_report(client: redis.Redis, models: Sequence[str], since_s: float, *,
                now: float | None = None, tenants: set[str] | None = None,
                policy: SloPolicy | None = None,
                price_per_gpu_hour: float | None = None) -> Report:
    """Read this window and the one before it, and build the report."""
    now = time.time() if now is None else now
    window = load_window(client, models, since_s, now, tenants=tenants)
    previous = load_window(client, models, since_s, window.since - 1e-6, tenants=tenants,
                           with_series=False)
    return build_report(window, previous, policy=policy, price_per_gpu_hour=price_per_gpu_hour)


async def load_report_async(client, models: Sequence[str], since_s: float, *,
                            now: float | None = None, tenants: set[str] | None = None,
                            policy: SloPolicy | None = None,
                            price_per_gpu_hour: float | None = None) -> Report:
    now = time.time() if now is None else now
    window = await load_window_async(client, models, since_s, now, tenants=tenants)
    previous = await load_window_async(client, models, since_s, window.since - 1e-6,
                                       tenants=tenants, with_series=False)
    return build_report(window, previous, policy=policy, price_per_gpu_hour=price_per_gpu_hour)


def to_json(report: Report) -> bytes:
    return msgspec.json.encode(report)


def run_report(url: str, models: Sequence[str], *, since: str, html_path: Path | None = None,
               json_path: Path | None = None, tenant: str = "",
               policy: SloPolicy | None = None, price_per_gpu_hour: float | None = None) -> int:
    """Print the report of the last `since` (text), or write it as HTML or JSON."""
    from agentfleet.ops.report_render import render_html, render_text
    from agentfleet.producer.connection import connect_sync
    from agentfleet.schemas.errors import ValidationError

    try:
        since_s = parse_duration(since)
    except ValueError as exc:
        raise ValidationError("since", str(exc), value=since) from exc
    if since_s < 60:
        raise ValidationError("since", f"{since!r}: a report covers at least a minute",
                              limit=60, value=since)
    if price_per_gpu_hour is not None and not 0 <= price_per_gpu_hour < 1e6:
        raise ValidationError("price_per_gpu_hour", f"{price_per_gpu_hour} is outside 0..1e6",
                              limit=1e6, value=price_per_gpu_hour)
    client = connect_sync(url)
    try:
        report = load_report(client, models, since_s, tenants={tenant} if tenant else None,
                             policy=policy, price_per_gpu_hour=price_per_gpu_hour)
    finally:
        client.close()
    if html_path is not None:
        html_path.write_text(render_html(report))
        print(f"report written to {html_path}")
    if json_path is not None:
        if str(json_path) == "-":
            print(to_json(report).decode())
        else:
            json_path.write_bytes(to_json(report))
            print(f"report written to {json_path}")
    if html_path is None and json_path is None:
        print(render_text(report), end="")
    return 0
