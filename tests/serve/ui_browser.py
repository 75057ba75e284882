"""Driving the web page in a real headless Chromium (the OS package, never a browser Playwright downloads).

``launch_browser`` starts ``/usr/bin/chromium`` through Playwright with a fresh profile and every background
service off, so the only traffic is the page's own. ``PageProbe`` records what a page does that a test must
check afterwards: requests to any other origin, script errors, and console errors.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    """The system Chromium; a clear failure (never a skip) when it is missing."""
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.fail(f"the browser tests need Chromium at {CHROMIUM}: install it with "
                    f"`apt-get install -y chromium chromium-driver` (what .ci/run does)")
    return CHROMIUM


def launch_browser(playwright: Any, profile_dir: Path) -> Any:
    """A persistent Chromium context on a fresh profile folder."""
    return playwright.chromium.launch_persistent_context(
        str(profile_dir), executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS,
        viewport={"width": 1400, "height": 900})


@dataclass
class PageProbe:
    """What one page did: requests outside ``origin``, uncaught errors, console errors."""

    origin: str
    foreign_requests: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)

    def attach(self, page: Any) -> None:
        def on_request(request: Any) -> None:
            if not request.url.startswith(self.origin + "/"):
                self.foreign_requests.append(request.url)

        page.on("request", on_request)
        page.on("pageerror", lambda exc: self.page_errors.append(str(exc)))
        page.on("console", lambda msg: self.console_errors.append(msg.text) if msg.type == "error" else None)
