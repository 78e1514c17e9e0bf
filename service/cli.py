"""The ``salon-reports`` command: serve, migrate, seed, token, simulate, follow, rollups."""

from __future__ import annotations

from typing import Annotated

import typer

from service.config import get_settings, serving_settings

# The uvicorn options of `serve`, shared with the load test's bare FastAPI app
# (benchmarks/bare_app.py) so that both are served alike.
UVICORN_OPTIONS: dict[str, object] = {"proxy_headers": False, "timeout_graceful_shutdown": 10}

app = typer.Typer(
    help="salon-reports: reporting service of a salon-booking platform.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals may hold secrets
)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = False,
) -> None:
    """Serve the API with uvicorn."""
    import uvicorn

    serving_settings(host)  # fail fast on bad configuration, before forking workers
    uvicorn.run(
        "service.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        access_log=access_log,
        **UVICORN_OPTIONS,  # type: ignore[arg-type]
    )


@app.command()
def migrate(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Upgrade the database schema (Alembic)."""
    from service.db import migrate as run_migrations

    run_migrations(get_settings().database_url, revision)
    typer.echo(f"database migrated to {revision}")


@app.command()
def seed(
    bookings: Annotated[int, typer.Option(min=0, help="Bookings to generate.")] = 100_000,
    salons: Annotated[int, typer.Option(min=1, help="Salons to generate.")] = 20,
    days: Annotated[
        int, typer.Option(min=1, help="Days of history, ending a week from today.")
    ] = 400,
    seed: Annotated[int, typer.Option("--seed", help="Random seed; same seed, same data.")] = 42,
    if_empty: Annotated[bool, typer.Option(help="Do nothing when bookings exist.")] = False,
) -> None:
    """Generate a realistic, deterministic dataset with COPY."""
    from service.tools.seed import seed_database

    summary = seed_database(
        get_settings().database_url,
        bookings=bookings,
        salons=salons,
        days=days,
        seed=seed,
        if_empty=if_empty,
        progress=True,
    )
    typer.echo(summary)
    if "nothing seeded" not in summary:
        # A bulk load is cheaper to recompute than to fold row by row: the rebuild restarts
        # the change stream after the load.
        _rebuild(quiet=False)


@app.command()
def token(
    role: Annotated[str, typer.Option(help="admin, ops or owner.")],
    salon: Annotated[
        list[int] | None, typer.Option("--salon", help="Salon id (owners; repeat).")
    ] = None,
    ttl: Annotated[int, typer.Option(min=1, help="Lifetime in seconds.")] = 3600,
    subject: Annotated[str | None, typer.Option(help="The `sub` claim.")] = None,
) -> None:
    """Print a signed bearer token (with the configured issuer and audience, if any)."""
    from service.auth import ROLES, issue_token

    if role not in ROLES:
        raise typer.BadParameter(f"role must be one of {', '.join(ROLES)}", param_hint="--role")
    if role == "owner" and not salon:
        raise typer.BadParameter("an owner token needs at least one --salon", param_hint="--salon")
    settings = get_settings()
    typer.echo(
        issue_token(
            settings.jwt_secret,
            role=role,  # type: ignore[arg-type]
            salon_ids=list(salon or []),
            ttl_seconds=ttl,
            subject=subject,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
        )
    )


@app.command()
def simulate(
    url: Annotated[str, typer.Option(help="The service to exercise.")] = "http://127.0.0.1:8000",
    rps: Annotated[float, typer.Option(min=0.1, max=500, help="Report requests a second.")] = 20,
    writes_per_min: Annotated[
        float, typer.Option(min=0, max=6000, help="Booking writes a minute, straight to SQL.")
    ] = 30,
    duration: Annotated[float, typer.Option(min=1, max=3600, help="Seconds to run.")] = 60,
) -> None:
    """Light, bounded traffic (Zipf report mix and booking writes) for the page and traces."""
    from service.tools.simulate import simulate as run_simulation

    typer.echo(run_simulation(url=url, rps=rps, writes_per_min=writes_per_min, duration=duration))


rollups = typer.Typer(help="The tables derived from bookings (see docs/design.md, Write path).")
app.add_typer(rollups, name="rollups")


def _dsn() -> str:
    from service.db import libpq_url

    return libpq_url(get_settings().session_database_url)


def _rebuild(*, quiet: bool) -> None:
    import asyncio

    from service.changes.rebuild import rebuild

    rebuilt = asyncio.run(rebuild(_dsn()))
    if not quiet:
        typer.echo(
            f"derived tables rebuilt in {rebuilt.seconds:.1f} s from one snapshot; the change"
            f" stream continues from slot {rebuilt.slot_name}"
        )
        for table, rows in rebuilt.rows.items():
            typer.echo(f"  {table}: {rows} rows")


@rollups.command("rebuild")
def rollups_rebuild() -> None:
    """Recompute every derived table from bookings and restart the change stream, exactly,
    while writes go on (also what brings a lost stream back)."""
    _rebuild(quiet=False)


@rollups.command("verify")
def rollups_verify(
    rounds: Annotated[int, typer.Option(min=1, help="Comparisons a difference must survive.")] = 3,
) -> None:
    """Recompute every derived table from bookings and print the differences (exit 1 if any)."""
    import asyncio

    from service.changes.verify import verify

    differences = asyncio.run(verify(_dsn(), rounds=rounds))
    for difference in differences[:1000]:
        typer.echo(str(difference))
    if differences:
        typer.echo(f"{len(differences)} differences", err=True)
        raise typer.Exit(1)
    typer.echo("every derived table equals its recomputation from bookings")


@app.command()
def follow() -> None:
    """Run only the change-stream consumer (``serve`` runs one too; one is active at a time)."""
    import asyncio
    import logging
    import signal

    from service.changes.consumer import ChangeConsumer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    async def run() -> None:
        consumer = ChangeConsumer(_dsn())
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, consumer.request_stop)
        await consumer.run()

    asyncio.run(run())


if __name__ == "__main__":
    app()
