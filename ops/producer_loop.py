"""A demo producer for the Procfile: submits two-step agent chains at a steady rate, forever.

    python -m agentfleet.ops.producer_loop --rate 2     (REDIS_URL, or the local server)
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging

from agentfleet.ops.cli import redis_url
from agentfleet.ops.demo import QUESTIONS
from agentfleet.producer.client import Producer
from agentfleet.schemas.errors import AgentFleetError
from agentfleet.schemas.settings import Settings
from agentfleet.schemas.wire import FollowUp, Message, Sampling, Task

log = logging.getLogger("agentfleet.producer_loop")


async def run(url: str, settings: Settings, rate: float, max_tokens: int) -> None:
    async with Producer.from_url(url, settings=settings) as producer:
        pending: set[asyncio.Task] = set()
        for n in itertools.count():
            root = Task(model=settings.default_model, agent_id=f"loop-{n % 8}",
                        messages=[Message(role="user", content=QUESTIONS[n % len(QUESTIONS)])],
                        sampling=Sampling(max_tokens=max_tokens),
                        followups=[FollowUp(prompt="In five words: {output}")])
            await producer.submit(root)
            job = asyncio.create_task(report(producer, root.id))
            pending.add(job)
            job.add_done_callback(pending.discard)
            await asyncio.sleep(1 / rate)


async def report(producer: Producer, task_id: str) -> None:
    try:
        chain = await producer.wait_chain(task_id, timeout_s=600)
    except AgentFleetError as exc:
        log.warning("chain %s: %s", task_id, exc)
        return
    last = chain[-1]
    log.info("chain %s: %d steps, %.2f s: %s", task_id, len(chain),
             last.timings.written - chain[0].timings.enqueued, last.text.strip()[:100])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=1.0, help="chains per second")
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    settings = Settings.from_env()
    with redis_url(settings) as url:
        asyncio.run(run(url, settings, args.rate, args.max_tokens))


if __name__ == "__main__":
    main()
