"""Headless Chromium for UI tests: Debian's `chromium` driven by Playwright's Python package (its bundled
browsers are never downloaded; `.ci/run` installs the Debian package when missing)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

CHROMIUM = os.environ.get("ORPO_RAY_CHROMIUM", "/usr/bin/chromium")
# What works in a container without a GPU, sandbox or outside network. Playwright adds --headless and a fresh
# profile directory (--user-data-dir) itself.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def chromium_missing() -> str | None:
    """Why no browser test can run here, or None."""
    if not shutil.which(CHROMIUM):
        return f"{CHROMIUM} not found: apt-get install -y chromium (see .ci/run)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "the playwright package is not installed: pip install -e '.[test]'"
    return None


@contextlib.contextmanager
def browser_page(width: int = 1600, height: int = 900) -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(120_000)  # the UI's first load on a busy 2-core machine
            yield page
        finally:
            browser.close()
