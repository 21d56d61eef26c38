"""`agentfleet batch ...`: bulk jobs in the OpenAI Batch format, from the command line.

    agentfleet batch submit requests.jsonl [--model-map gpt-4o-mini=smollm2-135m]
                            [--skip-invalid] [--completion-window 24h] [--batch-id ID] [--wait]
    agentfleet batch status ID [--json]
    agentfleet batch wait ID [--timeout-s S]         a progress bar with rate and ETA
    agentfleet batch results ID -o out.jsonl [--errors err.jsonl]
    agentfleet batch cancel ID
    agentfleet batch list [--count 20]

The logic lives in `producer.batch.BatchClient`; this module parses arguments and prints.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from agentfleet.schemas.errors import AgentFleetError, InvalidBatchFileError
from agentfleet.schemas.settings import Settings

SHOWN_ERRORS = 20  # invalid lines printed by `submit`; the rest are counted


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The `batch` command and its subcommands, under the CLI's subparsers."""
    p = sub.add_parser("batch", help="bulk jobs in the OpenAI Batch format")
    p.set_defaults(func=cmd_batch)
    actions = p.add_subparsers(dest="action", required=True)
    s = actions.add_parser("submit", help="validate a JSONL file and queue its requests")
    s.add_argument("file", help="OpenAI batch input: one request object per line")
    s.add_argument("--model-map", default="",
                   help="NAME=MODEL,... : serve the file's model names with these models")
    s.add_argument("--skip-invalid", action="store_true",
                   help="queue the valid lines even when others are invalid")
    s.add_argument("--completion-window", default="24h",
                   help="e.g. 24h, 30m: unfinished requests then expire (default 24h)")
    s.add_argument("--batch-id", default="",
                   help="resume (or name) this batch; default: a new id")
    s.add_argument("--endpoint", default=None,
                   help="/v1/chat/completions or /v1/completions (default: the first line's)")
    s.add_argument("--wait", action="store_true", help="then wait, as `batch wait` does")
    s.add_argument("--timeout-s", type=float, default=None, help="with --wait: give up after")
    s = actions.add_parser("status", help="a job's status and request counts")
    s.add_argument("batch_id")
    s.add_argument("--json", action="store_true", help="the OpenAI Batch object, as JSON")
    s = actions.add_parser("wait", help="wait for a job to settle, with a progress bar")
    s.add_argument("batch_id")
    s.add_argument("--timeout-s", type=float, default=None)
    s = actions.add_parser("results", help="write the output (and error) file of a job")
    s.add_argument("batch_id")
    s.add_argument("-o", "--output", required=True, help="the output file (JSONL)")
    s.add_argument("--errors", default=None,
                   help="the error file; without it, errors go into the output file")
    s = actions.add_parser("cancel", help="cancel a job: queued requests do not run")
    s.add_argument("batch_id")
    s = actions.add_parser("list", help="the newest jobs")
    s.add_argument("--count", type=int, default=20)


def cmd_batch(args: argparse.Namespace, settings: Settings) -> int:
    from agentfleet.ops.cli import redis_url

    with redis_url(settings) as url:
        return asyncio.run(_run(args, settings, url))


async def _run(args: argparse.Namespace, settings: Settings, url: str) -> int:
    from agentfleet.producer.batch import BatchClient

    async with BatchClient.from_url(url, settings=settings) as client:
        match args.action:
            case "submit":
                return await _submit(client, args)
            case "status":
                st = await client.status(args.batch_id)
                print(json.dumps(st.to_openai(), indent=2) if args.json else render(st))
                return 0
            case "wait":
                return await _wait(client, args.batch_id, args.timeout_s)
            case "results":
                report = await client.write_results(args.batch_id, args.output, args.errors)
                where = f" to {args.errors}" if args.errors else ""
                print(f"{report.output} lines to {args.output}, {report.errors} errors{where}"
                      + (f"; {report.missing} requests have no result yet"
                         if report.missing else ""))
                return 0
            case "cancel":
                print(render(await client.cancel(args.batch_id)))
                return 0
            case "list":
                for st in await client.list_batches(args.count):
                    print(f"{st.id}  {st.status:<11} {st.done:>9,}/{st.total:<9,} "
                          f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(st.created_at))}  "
                          f"{st.input_file}")
                return 0
    raise AgentFleetError(f"batch {args.action}: unknown action")


async def _submit(client, args: argparse.Namespace) -> int:
    try:
        report = await client.submit(
            args.file, batch_id=args.batch_id or None, model_map=args.model_map,
            skip_invalid=args.skip_invalid, completion_window=args.completion_window,
            endpoint=args.endpoint)
    except InvalidBatchFileError as exc:
        _print_errors(exc.errors, exc.invalid)
        raise
    if report.invalid:
        _print_errors(report.errors, report.invalid, skipped=True)
    per_model = ", ".join(f"{m}: {n:,}" for m, n in sorted(report.models.items()))
    rate = report.total / max(report.validate_s + report.submit_s, 1e-9)
    print(f"batch {report.batch_id}: {report.total:,} requests queued ({per_model}) in "
          f"{report.validate_s + report.submit_s:.1f} s ({rate:,.0f} lines/s)"
          + ("; resumed: requests queued before were not queued again" if report.resumed
             else ""), flush=True)
    if args.wait:
        return await _wait(client, report.batch_id, args.timeout_s)
    return 0


def _print_errors(errors: list[tuple[int, str]], invalid: int, skipped: bool = False) -> None:
    for line_no, reason in errors[:SHOWN_ERRORS]:
        print(f"line {line_no}: {reason}", file=sys.stderr)
    if invalid > SHOWN_ERRORS:
        print(f"... and {invalid - SHOWN_ERRORS} more invalid lines", file=sys.stderr)
    if skipped:
        print(f"{invalid} invalid lines skipped", file=sys.stderr)


async def _wait(client, batch_id: str, timeout_s: float | None) -> int:
    """Wait with a progress bar (finished requests, rate, ETA); 0 if every request succeeded."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:,.0f} req/s" if speed else "- req/s")

    await client.status(batch_id)  # an unknown id fails here, before a bar is drawn
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  RateColumn(), TextColumn("eta"), TimeRemainingColumn(), TimeElapsedColumn(),
                  console=console, speed_estimate_period=30) as bar:
        task = bar.add_task(batch_id, total=None)

        def show(st) -> None:
            bar.update(task, total=st.total or None, completed=st.done,
                       description=f"{batch_id} {st.status}")

        st = await client.wait(batch_id, timeout_s=timeout_s, on_progress=show)
    print(render(st))
    return 0 if st.status == "completed" and st.failed == 0 else 1


def render(st) -> str:
    """A job's status in a few lines."""
    lines = [f"batch {st.id}: {st.status}  {st.done:,}/{st.total:,} finished  "
             f"(completed {st.completed:,}, failed {st.failed:,})"]
    if st.by_status:
        lines.append("  by status: " + ", ".join(f"{k} {v:,}"
                                                  for k, v in sorted(st.by_status.items())))
    for model, (total, done) in sorted(st.models.items()):
        lines.append(f"  {model}: {done:,}/{total:,}")
    if st.total and st.enqueued < st.total and not st.settled:
        lines.append(f"  enqueued {st.enqueued:,}/{st.total:,} (if the submitter stopped, "
                     f"submit the same file with --batch-id {st.id} to resume)")
    if st.expires_at and not st.settled:
        left_s = st.expires_at - time.time()
        lines.append(f"  expires in {left_s / 3600:.1f} h" if left_s > 0
                     else "  the completion window has passed: what is left expires")
    if st.invalid:
        lines.append(f"  {st.invalid:,} invalid lines" + (" skipped" if st.total else ""))
        lines += [f"    line {n}: {reason}" for n, reason in st.errors[:SHOWN_ERRORS]]
    lines.append(f"  endpoint {st.endpoint or '-'}, input {st.input_file or '-'}, "
                 f"window {st.completion_window}")
    return "\n".join(lines)
