"""Check a rendered report in a real browser: headless Chromium loads the page and its images.

:func:`check` opens ``report.html`` from disk twice in headless Chromium (a fresh profile in a
temporary folder each time, a time limit): once to dump the DOM after the page's ``load``
event, from which it reads the image count the page's inline script wrote into
``#image-check``, and once to take a screenshot. Chromium is Debian's ``chromium`` package
(``apt-get install -y chromium``; ``make setup`` installs it).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
_CHECK = re.compile(r'<p id="image-check" data-loaded="(\d+)" data-total="(\d+)"')


@dataclass(frozen=True)
class BrowserCheck:
    """What the browser saw: images decoded out of the page's images, and the screenshot."""

    loaded: int
    total: int
    screenshot: Path | None


def find_browser() -> str:
    """Return the path of a Chromium binary, or raise a FileNotFoundError saying how to install one."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError(
        f"no headless browser found (looked for {', '.join(BROWSERS)}); install Debian's chromium: "
        "apt-get install -y chromium"
    )


def _run(args: list[str], timeout: float) -> str:
    with tempfile.TemporaryDirectory(prefix="mixq-chromium-") as profile:
        cmd = [
            find_browser(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-extensions",
            "--no-first-run",
            f"--user-data-dir={profile}",
            *args,
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"chromium did not finish within {timeout:g} s: {' '.join(cmd)}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"chromium exited with {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stdout


def image_count(dom: str) -> tuple[int, int]:
    """Read (loaded, total) from the ``#image-check`` element of a dumped DOM.

    >>> image_count('<p id="image-check" data-loaded="3" data-total="4">3 of 4</p>')
    (3, 4)
    """
    m = _CHECK.search(dom)
    if m is None:
        raise ValueError("the page has no #image-check element with data-loaded and data-total")
    return int(m.group(1)), int(m.group(2))


def check(
    page: str | Path,
    screenshot: str | Path | None = None,
    size: tuple[int, int] = (1200, 900),
    timeout: float = 90.0,
) -> BrowserCheck:
    """Load a report in headless Chromium; count the decoded images and optionally take a screenshot.

    Args:
        page: the ``report.html`` file.
        screenshot: a PNG path to write a screenshot of the page's top to (None: none).
        size: the window's (width, height) in pixels, the screenshot's size.
        timeout: seconds allowed for each browser run.

    Returns:
        A :class:`BrowserCheck`.
    """
    url = Path(page).resolve().as_uri()
    dom = _run(["--virtual-time-budget=10000", "--dump-dom", url], timeout)
    loaded, total = image_count(dom)
    shot = None
    if screenshot is not None:
        shot = Path(screenshot).resolve()
        shot.unlink(missing_ok=True)
        window = f"--window-size={size[0]},{size[1]}"
        _run(["--hide-scrollbars", window, f"--screenshot={shot}", url], timeout)
        if not shot.is_file():
            raise RuntimeError(f"chromium wrote no screenshot to {shot}")
    return BrowserCheck(loaded, total, shot)
