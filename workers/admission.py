"""Admission: tasks read and checked wait here for an engine slot, and leave in fair order.

The engine runs at most `slots` requests (vLLM's max_num_seqs).  Handing it more only moves
the queue into vLLM's own waiting list, which is first come, first served: a tenant's flood
would then sit in front of everybody's next task.  So the runner keeps the surplus here and
dispatches as slots free (docs/tenants.md):

  - lanes: an interactive task always goes before a bulk one; bulk tasks hold at most
    `bulk_cap` slots, so that interactive work finds one within an engine step or two;
  - tenants, within a lane: the backlogged tenant with the lowest virtual token counter goes
    next (the Virtual Token Counter of Sheng et al., OSDI 2024): a dispatch charges the
    tenant prompt + max_tokens over its weight, corrected by the real counts when the task
    ends, so that long prompts buy no larger share; a tenant that comes back from idle is
    lifted to the lowest counter of those waiting, so idle time banks no credit;
  - within a tenant: higher task priority first, then arrival;
  - a tenant's `max_running` (split across the model's live workers) caps its slots;
  - spare slots (`spare`, beyond `slots`: vLLM runs both) go only to a tenant running fewer
    than its fair share of `slots`: when a flood of equal tasks holds every slot, they all
    end together, and a newcomer would wait for that whole wave; through a spare slot its
    task starts at the next engine step.  What it borrows is paid back: the flood's next
    tasks start only once fewer than `slots` run.
Nothing is held back that nobody else wants: a slot is never left free while a task waits.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable

from agentfleet.schemas.tenants import estimate_tokens
from agentfleet.schemas.wire import Task

Request = tuple[str, Task]  # (request id, task): what the engine's submit takes


class _TenantQueue:
    __slots__ = ("heap", "counter", "running", "weight", "limit", "stamp")

    def __init__(self, counter: float):
        self.heap: list[tuple[int, int, str, Task]] = []  # (-priority, arrival, id, task)
        self.counter = counter  # virtual tokens: served tokens / weight
        self.running = 0
        self.weight = 1.0
        self.limit = 0  # most running at once on this worker; 0: no limit
        self.stamp = 0  # its entry in the lane's order is current only with this stamp


class _Lane:
    """One lane's tenants and the order they are served in."""

    __slots__ = ("tenants", "order", "waiting", "vtime")

    def __init__(self) -> None:
        self.tenants: dict[str, _TenantQueue] = {}
        # (counter, or the head task's arrival when fairness is off; stamp; tenant): lazy,
        # an entry whose stamp is not its tenant's any more is skipped
        self.order: list[tuple[float, int, str]] = []
        self.waiting = 0
        self.vtime = 0.0  # the counter of the last dispatch: where idle tenants come back


class Charge:
    """What a dispatch charged, to correct when the task ends."""

    __slots__ = ("tenant", "bulk", "tokens", "weight")

    def __init__(self, tenant: str, bulk: bool, tokens: int, weight: float):
        self.tenant = tenant
        self.bulk = bulk
        self.tokens = tokens
        self.weight = weight


class Admission:
    """The fair queue between a runner's reads and its engine."""

    def __init__(self, *, slots: int | None, bulk_cap: int, fair: bool = True,
                 policy: Callable[[str], tuple[float, int]] | None = None, spare: int = 0):
        self.slots = slots  # None: the engine takes everything at once (the fake engine)
        self.spare = spare if slots is not None and fair else 0
        self.bulk_cap = bulk_cap
        self.fair = fair  # False: first come, first served across tenants (within a lane)
        self._policy = policy or (lambda tenant: (1.0, 0))  # tenant -> (weight, limit)
        self._lanes = (_Lane(), _Lane())  # interactive, bulk
        self._arrival = itertools.count()
        self.running = 0
        self.running_bulk = 0
        self.charges: dict[str, Charge] = {}  # request id -> its charge, while running
        self.served: dict[tuple[bool, str], int] = {}  # (bulk?, tenant) -> tokens it ran

    @property
    def waiting(self) -> int:
        return self._lanes[0].waiting + self._lanes[1].waiting

    def waiting_by_tenant(self) -> dict[str, int]:
        """Tasks waiting per tenant, both lanes (the reader reads the emptiest first)."""
        waiting: dict[str, int] = {}
        for lane in self._lanes:
            for tenant, q in lane.tenants.items():
                if q.heap:
                    waiting[tenant] = waiting.get(tenant, 0) + len(q.heap)
        return waiting

    def set_policy(self, policy: Callable[[str], tuple[float, int]]) -> None:
        """New weights and limits (the registry changed): applied from the next dispatch."""
        self._policy = policy
        for lane in self._lanes:
            for name, q in lane.tenants.items():
                q.weight, q.limit = policy(name)

    def offer(self, requests: list[tuple[str, Task, bool]]) -> list[Request]:
        """Take checked tasks (request id, task, bulk?); return those to start now."""
        if self.slots is None and not self.waiting:  # no slot limit: nothing to order
            return [(rid, task) for rid, task, _ in requests]
        arrived: set[tuple[bool, str]] = set()
        for request_id, task, bulk in requests:
            lane = self._lanes[bulk]
            q = lane.tenants.get(task.tenant)
            if q is None:
                q = lane.tenants[task.tenant] = _TenantQueue(lane.vtime)
                q.weight, q.limit = self._policy(task.tenant)
            idle = not q.heap
            if idle:  # back from idle: no credit banked while away
                floor = self._lowest_waiting(lane)
                q.counter = max(q.counter, lane.vtime if floor is None else floor)
            heapq.heappush(q.heap, (-task.priority, next(self._arrival), request_id, task))
            lane.waiting += 1
            if idle:
                self._push_order(lane, task.tenant, q)
            arrived.add((bulk, task.tenant))
        out = self.dispatch()
        if self.spare and self.waiting and self.running >= self.slots:
            out += self._spare(arrived)
        return out

    def dispatch(self) -> list[Request]:
        """Tasks to start now: as many as there are free slots."""
        out: list[Request] = []
        slots = self.slots
        while self.waiting and (slots is None or self.running < slots):
            picked = self._next(self._lanes[0], False)
            if picked is None and self.running_bulk < self.bulk_cap:
                picked = self._next(self._lanes[1], True)
            if picked is None:
                break  # what waits is capped (bulk share, tenant limits): a finish frees it
            out.append(picked)
        return out

    def _spare(self, arrived: set[tuple[bool, str]]) -> list[Request]:
        """Spare slots for the tenants that just brought work, while they run fewer than
        their fair share of `slots` (only an arrival can make one eligible: a finish frees a
        slot of its own).  Interactive first; bulk within its cap."""
        out: list[Request] = []
        for bulk, tenant in sorted(arrived):
            lane = self._lanes[bulk]
            q = lane.tenants[tenant]
            share = self.slots * q.weight / self._weights(lane)
            while (q.heap and q.running < share and self.running < self.slots + self.spare
                   and (not q.limit or q.running < q.limit)
                   and (not bulk or self.running_bulk < self.bulk_cap)):
                out.append(self._take(lane, tenant, q, bulk))
        return out

    def done(self, request_id: str, prompt_tokens: int, output_tokens: int) -> None:
        """A dispatched task ended: free its slot, correct its tenant's charge."""
        charge = self.charges.pop(request_id, None)
        if charge is None:
            return
        self.running -= 1
        if charge.bulk:
            self.running_bulk -= 1
        lane = self._lanes[charge.bulk]
        q = lane.tenants.get(charge.tenant)
        if q is None:
            return
        q.running -= 1
        if prompt_tokens or output_tokens:  # the real counts replace the estimate
            q.counter += (prompt_tokens + output_tokens - charge.tokens) / charge.weight
            key = (charge.bulk, charge.tenant)
            self.served[key] = self.served.get(key, 0) + prompt_tokens + output_tokens
        if q.heap:
            self._push_order(lane, charge.tenant, q)

    def _next(self, lane: _Lane, bulk: bool) -> Request | None:
        if not lane.waiting:
            return None
        deferred = []
        picked = None
        while lane.order:
            entry = heapq.heappop(lane.order)
            tenant = entry[2]
            q = lane.tenants[tenant]
            if not q.heap or entry[1] != q.stamp:
                continue  # stale: the tenant drained, or was pushed again since
            if q.limit and q.running >= q.limit:
                deferred.append(entry)
                continue
            picked = self._take(lane, tenant, q, bulk)
            break
        for entry in deferred:
            heapq.heappush(lane.order, entry)
        return picked

    def _take(self, lane: _Lane, tenant: str, q: _TenantQueue, bulk: bool) -> Request:
        """Start the tenant's next task: charge it, count its slot."""
        _, _, request_id, task = heapq.heappop(q.heap)
        lane.waiting -= 1
        tokens = estimate_tokens(task)
        lane.vtime = q.counter
        if self.fair:
            q.counter += tokens / q.weight
        q.running += 1
        self.charges[request_id] = Charge(tenant, bulk, tokens, q.weight)
        self.running += 1
        if bulk:
            self.running_bulk += 1
        if q.heap:
            self._push_order(lane, tenant, q)  # a new stamp: its old entry goes stale
        return request_id, task

    def _push_order(self, lane: _Lane, tenant: str, q: _TenantQueue) -> None:
        q.stamp = next(self._arrival)
        # Fairness off: the head task's arrival orders tenants, first come, first served.
        key = q.counter if self.fair else q.heap[0][1]
        heapq.heappush(lane.order, (key, q.stamp, tenant))

    @staticmethod
    def _weights(lane: _Lane) -> float:
        """The weights of the lane's tenants with work (waiting or running)."""
        return sum(q.weight for q in lane.tenants.values() if q.heap or q.running)

    @staticmethod
    def _lowest_waiting(lane: _Lane) -> float | None:
        lowest = math.inf
        for q in lane.tenants.values():
            if q.heap and q.counter < lowest:
                lowest = q.counter
        return None if lowest == math.inf else lowest

    def drop(self, request_id: str) -> Task | None:
        """Take a waiting task out (cancelled before it started); None if not waiting."""
        for lane in self._lanes:
            for q in lane.tenants.values():
                for i, entry in enumerate(q.heap):
                    if entry[2] == request_id:
                        q.heap.pop(i)
                        heapq.heapify(q.heap)
                        lane.waiting -= 1
                        return entry[3]
        return None

    def tenant_figures(self) -> dict[tuple[str, str], tuple[int, int, int, float]]:
        """(lane, tenant) -> (waiting, running, tokens served, weight): for the metrics."""
        out = {}
        for bulk, (name, lane) in enumerate(zip(("interactive", "bulk"), self._lanes)):
            for tenant, q in lane.tenants.items():
                out[(name, tenant)] = (len(q.heap), q.running,
                                       self.served.get((bool(bulk), tenant), 0), q.weight)
        return out
