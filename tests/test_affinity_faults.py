"""The fault suite with affinity on (docs/affinity.md): the same kills, crashes and restarts as
tests/test_faults.py, with every worker and the producer on 8 affinity partitions, so that
tasks and their follow-ups sit in partition streams that workers own, steal and reclaim."""

from __future__ import annotations

import pytest
import test_faults
from test_faults import (  # noqa: F401  (the fixtures, and the tests run again here)
    fleet,
    producer,
    test_chaos_random_kills_and_a_server_restart,
    test_crash_after_engine_before_result_write,
    test_fan_outs_join_exactly_once_while_workers_are_killed,
    test_second_sigterm_stops_at_once_leaving_work_claimable,
    test_server_killed_and_restarted_under_load,
    test_sigkill_mid_batch_every_task_completes_once,
    test_sigstop_past_idle_time_is_fenced,
    test_sigterm_drains_in_flight_work_and_exits_0,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def affinity_on(monkeypatch):
    monkeypatch.setattr(test_faults, "PARTITIONS", 8)
