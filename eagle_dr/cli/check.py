"""``eagle-dr check``: compare the regions' data now (ConsistencyCheckWorkflow), steps live."""

from __future__ import annotations

import uuid
from typing import Optional

import typer

from eagle_dr.cli import _fail, _run_runbook, _start_and_follow, app, cfg, out


@app.command("check")
def check(table: Optional[list[str]] = typer.Option(None, "--table", "-t",
                                                    help="Table (or schema.table) to compare; repeat for more "
                                                         "(default: consistency.tables, else every user table)."),
          regions: Optional[str] = typer.Option(None, "--regions", help="A,B (default: the primary and its standby)."),
          database_b: Optional[str] = typer.Option(None, "--database-b",
                                                   help="Compare against this database on B's server (a copy)."),
          chunk_rows: Optional[int] = typer.Option(None, "--chunk-rows", min=100, help="Rows per range (this run)."),
          redis: bool = typer.Option(True, "--redis/--no-redis", help="Compare Redis too.")):
    """Compare PostgreSQL (by primary-key ranges, down to exact keys) and Redis between two regions.
    Exit 0: no differences; 3: differences found (the run ends 'degraded' and notifies); 1: failed."""
    from workflows.consistency import ConsistencyCheckWorkflow

    c = cfg()
    pair: list[str] = []
    if regions:
        pair = [r.strip() for r in regions.split(",")]
        if len(pair) != 2 or not all(pair):
            _fail(f"--regions: expected A,B, got {regions!r}")
        for r in pair:
            if c.region(r) is None:
                _fail(f"--regions: unknown region {r!r} (known: {', '.join(c.region_names)})")
        if pair[0] == pair[1]:
            _fail(f"--regions: the same region twice ({pair[0]!r})")
    inp = {"tables": table or [], "regions": pair, "redis": redis, "trigger": "cli"}
    if database_b:
        inp["database_b"] = database_b
    if chunk_rows:
        inp["chunk_rows"] = chunk_rows

    async def run():
        await _start_and_follow(c, "consistency check", ConsistencyCheckWorkflow.run, inp,
                                f"dr-check-{c.service}-{uuid.uuid4().hex[:8]}", report)

    _run_runbook("consistency check", run)


def report(r) -> None:
    out.print(f"[bold]consistency check[/] {r.service}: {r.region_a} vs {r.region_b}"
              + (f" (database {r.database_b})" if r.database_b else "")
              + (" at the primary's LSN" if r.follower else "") + f": {r.differences} differences", highlight=False)
    for t in r.tables:
        d = t.diff
        out.print(f"  {t.table}: {t.rows_a}/{t.rows_b} rows, {t.ranges} ranges ({t.ranges_checked} hashed), "
                  f"{t.seconds:.1f} s: +{d.inserted} ~{d.updated} -{d.deleted}"
                  + (f", {t.in_flight} in flight" if t.in_flight else "")
                  + (f", throttled {t.throttled_seconds:.0f} s" if t.throttled_seconds >= 1 else ""), highlight=False)
        for kind, keys in (("inserted on B", d.inserted_keys), ("updated", d.updated_keys),
                           ("deleted on B", d.deleted_keys)):
            if keys:
                shown = ", ".join("(" + ",".join(k) + ")" if len(k) > 1 else k[0] for k in keys[:20])
                out.print(f"    {kind}: {shown}" + (" ..." if len(keys) > 20 else ""), highlight=False)
    if r.redis is not None:
        x = r.redis
        out.print(f"  redis {x.a} vs {x.b}: " + ", ".join(f"db{c.db} {c.keys_a}/{c.keys_b} keys" for c in x.counts)
                  + f"; offsets {x.offset_a}/{x.offset_b}; {x.sampled} sampled, {x.missing_count} missing, "
                  f"{x.changed_count} changed", highlight=False)
        if x.missing or x.changed:
            out.print(f"    missing: {', '.join(x.missing[:20])}  changed: {', '.join(x.changed[:20])}",
                      highlight=False)
    for d in r.degraded:
        if d.startswith("Redis not compared"):
            out.print(f"  [yellow]{d}[/]", highlight=False)
