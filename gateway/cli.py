"""The ``brygga`` command."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from collections.abc import Coroutine
from datetime import datetime
from importlib.metadata import entry_points
from typing import Annotated, Any

import httpx
import structlog
import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError

from gateway import logs
from gateway.clock import STOCKHOLM
from gateway.settings import ALL_STAGES, Settings

app = typer.Typer(
    help="Brygga: discharge-coordination gateway (LUS).", no_args_is_help=True, add_completion=False
)
console = Console()


def _serve(stages: tuple[str, ...] | None) -> None:
    from gateway.runtime import Gateway

    settings = Settings()
    logs.configure(settings.log_level)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        gateway = Gateway(settings, stages)
        waiter = asyncio.create_task(gateway.run_until(stop))
        while not waiter.done() and gateway.waiting_for():
            await asyncio.sleep(0.05)
        if not waiter.done():
            _banner(settings, gateway)
        # Everything loaded at start lives as long as the process: keep it out of the
        # collector's scans, which would otherwise show as pauses in the ACK latency.
        gc.freeze()
        await waiter
        abandoned = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if abandoned:
            # Each shutdown step had its time; a task still blocked (a database call that
            # ignores cancellation) is abandoned. Safe: every effect was committed before it
            # was acknowledged, exactly as after a crash.
            logs.flush()
            os._exit(0)

    from gateway.crypto.kek import KeyUnavailable

    try:
        run_loop(main(), settings.event_loop)
    except KeyUnavailable as exc:  # ids only: which data key, which KEK is missing
        structlog.get_logger("brygga.runtime").error("gateway.keys_unavailable", detail=str(exc))
        logs.flush()
        raise typer.Exit(2) from None


def run_loop(main: Coroutine[Any, Any, None], kind: str) -> None:
    """Run the gateway on the configured event loop (uvloop unless told otherwise)."""
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:  # not built for this platform: Python's own loop works the same
            pass
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


def _banner(settings: Settings, gateway: Any) -> None:
    broker = (
        (gateway.broker.bootstrap + " (embedded)") if gateway.broker else (settings.kafka_bootstrap)
    )
    lines = [f"Brygga is running: stages {', '.join(gateway.stages)}"]
    if "api" in gateway.stages:
        url = f"{settings.http_scheme}://{settings.http_host}:{settings.http_port}"
        lines.append(f"  HTTP  {url}  (API docs: /docs)")
    if "intake" in gateway.stages:
        lines.append(f"  MLLP  {settings.mllp_host}:{settings.mllp_port}")
    lines.append(f"  DB    {gateway.db.engine.dialect.name}  Kafka {broker}")
    lines.append("Try `brygga demo` in another terminal. Ctrl-C stops.")
    console.print("\n".join(lines), highlight=False)


@app.command()
def run() -> None:
    """Run every stage in one process (embedded SQLite and broker unless configured)."""
    _serve(None)


@app.command()
def worker(
    stages: Annotated[
        str,
        typer.Option(
            help=f"Comma-separated, from: {','.join(ALL_STAGES)} and the stages adapters add"
        ),
    ],
) -> None:
    """Run some stages only, to scale them out. Needs BRYGGA_KAFKA_BOOTSTRAP and a shared DB."""
    from gateway.runtime import available_stages

    chosen = tuple(s.strip() for s in stages.split(",") if s.strip())
    available = available_stages()
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        raise typer.BadParameter(f"unknown stage(s) {unknown}; choose from {list(available)}")
    if Settings().kafka_bootstrap is None:
        raise typer.BadParameter("workers share a Kafka cluster: set BRYGGA_KAFKA_BOOTSTRAP")
    _serve(chosen)


@app.command()
def migrate() -> None:
    """Apply database migrations (``brygga run`` does this itself on start)."""
    from gateway.store.db import migrate_sync

    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate_sync(settings.db_url)
    console.print("Database is at the newest schema.")


@app.command()
def token(
    org: Annotated[str, typer.Option(help="The caller's organisation, an HSA-id.")],
    name: Annotated[
        str, typer.Option(help="The person's (or system's) name, recorded in receipts.")
    ],
    role: Annotated[
        str,
        typer.Option(help="staff, ops, auditor, integration, directory-admin or consent-admin."),
    ] = "staff",
    title: Annotated[
        str, typer.Option(help="The person's title (befattning), e.g. Undersköterska.")
    ] = "",
    subject: Annotated[
        str, typer.Option(help="The person's stable id (e.g. their HSA-id); default: name.")
    ] = "",
    hours: Annotated[float, typer.Option(help="Validity.")] = 8.0,
) -> None:
    """Issue a bearer token for one person, signed with this gateway's local key. Receipts,
    answers and the audit trail name the token's person; request bodies cannot."""
    from gateway.api.auth import TokenKeys

    try:
        keys = TokenKeys.from_dir(Settings().keys_dir, create=False)
        print(keys.issue(org, role, name, title, hours, subject))
    except FileNotFoundError as exc:
        console.print(str(exc))
        raise typer.Exit(2) from None
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command()
def status(message_id: Annotated[str, typer.Argument(help="The gateway's message id.")]) -> None:
    """Print the receipt ledger of a message."""
    from gateway.pipeline.views import message_ledger
    from gateway.store.db import Database

    async def fetch() -> dict[str, Any] | None:
        db = Database(Settings().db_url)
        try:
            async with db.read() as conn:
                return await message_ledger(conn, message_id)
        finally:
            await db.close()

    try:
        ledger = asyncio.run(fetch())
    except SQLAlchemyError as exc:  # never print the SQL: its parameters may hold patient data
        console.print(
            f"Cannot read the ledger ({type(exc).__name__}). Is the database there and migrated? "
            "Run this where the gateway runs, or set BRYGGA_DATA_DIR / BRYGGA_DATABASE_URL."
        )
        raise typer.Exit(2) from None
    if ledger is None:
        console.print(f"No message with id {message_id}.")
        raise typer.Exit(1)
    print_ledger(ledger)


def _local(iso: str) -> str:
    return datetime.fromisoformat(iso).astimezone(STOCKHOLM).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


@app.command()
def replay(message_id: Annotated[str, typer.Argument(help="The gateway's message id.")]) -> None:
    """Run a parked message (or its parked deliveries) again, once the cause is fixed."""
    from gateway.pipeline.replay import replay as do_replay
    from gateway.store.db import Database

    async def go() -> Any:
        db = Database(Settings().db_url)
        try:
            return await do_replay(db, message_id)
        finally:
            await db.close()

    try:
        done = asyncio.run(go())
    except SQLAlchemyError as exc:
        console.print(f"Cannot reach the database ({type(exc).__name__}).")
        raise typer.Exit(2) from None
    if done is None:
        console.print(f"No message with id {message_id}.")
        raise typer.Exit(1)
    if not done.message and not done.deliveries:
        console.print("Nothing is parked for this message; nothing was replayed.")
        return
    console.print(
        ("The message starts again from the consent stage. " if done.message else "")
        + (
            f"{done.deliveries} parked deliveries will be attempted again."
            if done.deliveries
            else ""
        )
    )


def print_ledger(ledger: dict[str, Any]) -> None:
    """The ledger as a table: one row per recipient, one line per receipt, Stockholm time."""
    consent = ledger["consent"]
    console.print(
        f"Message {ledger['id']} (MSH-10 {ledger['control_id']})\n"
        f"  event [bold]{ledger['event']}[/], status [bold]{ledger['status']}[/], "
        f"consent {consent['decision'] or '-'}: {consent['reason'] or 'not decided yet'}",
        highlight=False,
    )
    table = Table("Recipient", "Role", "Channel", "State", "Receipts (Europe/Stockholm)")
    for d in ledger["deliveries"]:
        lines = []
        for r in d["receipts"]:
            line = f"{r['state']:<13} {_local(r['at'])}"
            if r.get("by"):
                line += f"  {r['by']['name'] or '-'} ({r['by']['role']})"
            if r["state"] in ("held", "denied", "failed", "parked") and r.get("detail"):
                line += f"  {r['detail']}"
            lines.append(line)
        role = d["role"] + ("\n(för kännedom)" if d["for_information"] else "")
        table.add_row(
            f"{d['recipient']['name']}\n{d['recipient']['hsa_id']}",
            role,
            d["channel"] or "-",
            d["state"],
            "\n".join(lines),
        )
    console.print(table)


@app.command()
def demo(
    host: Annotated[str, typer.Option(help="Where the gateway runs.")] = "127.0.0.1",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each step.")] = 30.0,
) -> None:
    """Play an admission through a running gateway and print its receipt ledger."""
    from gateway.demo import play

    try:
        ledger = asyncio.run(play(Settings(), host, timeout, console.print))
    except (FileNotFoundError, OSError, TimeoutError, RuntimeError, httpx.HTTPError) as exc:
        console.print(f"The demo stopped: {exc or type(exc).__name__}")
        raise typer.Exit(1) from None
    print_ledger(ledger)


@app.command()
def clock(
    rule: Annotated[str, typer.Argument(help="A LUS clock, e.g. kvittens-inskrivning.")],
    start: Annotated[str, typer.Argument(help="When it starts: ISO 8601 with an offset.")],
    municipality: Annotated[
        str | None, typer.Option(help="Use this municipality's override, if it has one.")
    ] = None,
) -> None:
    """When a LUS deadline falls due (an operator's preview); the due time is the last line."""
    from gateway.pipeline.deadlines import DEADLINES_FILE, DeadlineError, Deadlines

    path = Settings().deadlines_file or DEADLINES_FILE
    try:
        moment = datetime.fromisoformat(start)
    except ValueError:
        console.print(f"START {start!r} is not ISO 8601 (e.g. 2026-11-27T15:00:00+01:00).")
        raise typer.Exit(2) from None
    try:
        chosen = Deadlines.load(path).rule(rule, municipality)
        due = chosen.due(moment)
    except DeadlineError as exc:
        console.print(str(exc))
        raise typer.Exit(2) from None
    console.print(f"{chosen.name}: {chosen.description or chosen.kind}", highlight=False)
    console.print(f"start {moment.astimezone(STOCKHOLM).isoformat()}", highlight=False)
    print(due.astimezone(STOCKHOLM).isoformat())


def _plug_in_commands() -> None:
    """Adapters add commands (``bench``, ``mappings``) through the ``brygga.commands`` entry
    point group: each names a Typer app, added under the entry point's name."""
    for ep in entry_points(group="brygga.commands"):
        app.add_typer(ep.load(), name=ep.name)


_plug_in_commands()

if __name__ == "__main__":  # pragma: no cover
    app()
