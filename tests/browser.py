"""Headless Debian Chromium for tests: the Temporal UI test, and any test that has to look at a
page (an HTML report opened from a file, and its screenshot).

Playwright drives ``/usr/bin/chromium`` (``executable_path``): nothing is downloaded. ``make
setup`` installs the Debian package; without it the tests that need a browser skip and say so.
Every screenshot goes under the test's own ``tmp_path`` and its path is printed, so a failed CI
run shows where to look.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"

# Quiet and self-contained: no sync, no component updates, no first-run UI, no QUIC probes
# (shared notes, temporal.md section 4). --no-sandbox because CI runs as root.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1440, "height": 1000}


def require_chromium() -> None:
    """Skip, naming the fix, only when the browser itself is missing (CI installs it)."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is not installed (Debian 'chromium'; `make setup` installs it as root)")


class Browser:
    """One page in a fresh Chromium profile, with numbered screenshots kept under ``shots``."""

    def __init__(self, page, shots: Path):
        self.page = page
        self.shots = shots
        self._n = 0
        self._t0 = time.monotonic()

    async def shot(self, name: str, *, full_page: bool = True) -> Path:
        self._n += 1
        path = self.shots / f"{self._n:02d}-{name}.png"
        await self.page.screenshot(path=str(path), full_page=full_page)
        # The time since the browser opened: where a slow UI test spends it, in CI's log.
        print(f"screenshot at {time.monotonic() - self._t0:.1f}s: {path}")
        return path

    async def shows(self, locator, name: str, timeout: float = 30_000) -> Path:
        """Assert that ``locator`` (e.g. a report's chart) is rendered: visible, with an area,
        inside the page; screenshot just that element and return the file."""
        await locator.wait_for(state="visible", timeout=timeout)
        box = await locator.bounding_box()
        assert box and box["width"] >= 10 and box["height"] >= 10, f"{name} has no area on the page: {box}"
        self._n += 1
        path = self.shots / f"{self._n:02d}-{name}.png"
        await locator.screenshot(path=str(path))
        print(f"screenshot at {time.monotonic() - self._t0:.1f}s: {path}")
        return path

    async def open_file(self, html: Path, name: str | None = None) -> Path:
        """Open a local HTML file (e.g. ``eagle-dr report --html``) and screenshot it once it has loaded.
        The page stays open on ``self.page`` for assertions on what it shows."""
        await self.page.goto(Path(html).resolve().as_uri(), wait_until="load")
        return await self.shot(name or Path(html).stem)


@asynccontextmanager
async def chromium(tmp_path: Path) -> AsyncIterator[Browser]:
    """A headless Chromium page; its profile and screenshots live under ``tmp_path``."""
    require_chromium()
    from playwright.async_api import async_playwright

    shots = tmp_path / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as p:
        ctx = await p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=ARGS,
            viewport=VIEWPORT)
        try:
            page = ctx.pages[0] if ctx.pages else await ctx.new_page()
            yield Browser(page, shots)
        finally:
            await ctx.close()
            print(f"screenshots kept in {shots}")
