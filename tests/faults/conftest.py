"""The fault-injection suite's markers, its default subset, and its table.

Every test here is marked ``faults``; the long ones also ``slow_fault``. Plain ``pytest``
(``make test``) runs only the representative subset, so the whole suite stays inside the CI
budget; ``EAGLE_DR_FAULTS=all`` (``make faults``) runs every fault. At the end of the session
the table fault x runbook -> invariants is printed, whatever ran.
"""

from __future__ import annotations

import os

from tests.faults.harness import ROWS
from tests.faults.invariants import INVARIANTS


def pytest_configure(config):
    config.addinivalue_line("markers", "faults: the fault-injection suite (tests/faults)")
    config.addinivalue_line("markers", "slow_fault: a fault run only by `make faults` (EAGLE_DR_FAULTS=all)")


def pytest_collection_modifyitems(config, items):
    # Last in the session: the other tests run on the lab as a fresh session leaves it (epochs,
    # timelines, the app's log), as they did before this suite existed.
    items.sort(key=lambda i: i.get_closest_marker("faults") is not None)  # stable
    if os.environ.get("EAGLE_DR_FAULTS") == "all":
        return
    slow = [i for i in items if i.get_closest_marker("slow_fault")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [i for i in items if not i.get_closest_marker("slow_fault")]


def pytest_terminal_summary(terminalreporter):
    if not ROWS:
        return
    tr = terminalreporter
    short = {"one writable pg": "1 writable PG", "one unfenced redis master": "1 Redis master",
             "routing = primary": "routing", "acked writes kept": "acked writes", "one audit row per key": "audit",
             "monitor: no false failover": "monitor", "cancel answered": "cancel"}
    head = ["fault", "runbook", "injected at", "run ended", *[short.get(k, k) for k in INVARIANTS]]
    rows = [[r.fault.name, r.fault.runbook, r.injected_at or r.fault.point, r.outcome or "(test error)",
             *[r.checks[k].cell if k in r.checks else "-" for k in INVARIANTS]] for r in ROWS]
    widths = [min(48, max(len(str(x[i])) for x in [head, *rows])) for i in range(len(head))]
    fmt = lambda cells: " | ".join(str(c)[:w].ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    tr.write_sep("=", "fault injection: fault x runbook -> invariants")
    tr.write_line(fmt(head))
    tr.write_line("-+-".join("-" * w for w in widths))
    for r in rows:
        tr.write_line(fmt(r))
    verbose = tr.config.option.verbose > 0
    for r in ROWS if verbose else []:
        tr.write_line("")
        tr.write_line(r.explain() + f"\n  lab restored by: {'; '.join(r.restored) or 'nothing needed'} "
                                    f"({r.seconds:.0f}s)")
    bad = [r for r in ROWS if any(c.held is False for c in r.checks.values())]
    for r in bad:
        tr.write_line("")
        tr.write_line("VIOLATED: " + r.explain())
