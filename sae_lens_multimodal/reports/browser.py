"""Open written reports in headless Chromium and check them: no console errors, no failed loads, every
image decoded, expected sections present; a screenshot of each page.

Uses Playwright's Python API with the system's Chromium (``chromium`` on PATH or ``/usr/bin/chromium``);
Playwright's own browser downloads are never used.

>>> with PageChecker() as checker:
...     result = checker.check("report/index.html", sections=["vision-features"], screenshot="shot.png")
...     assert result.ok, result.problems
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

__all__ = ["chromium_executable", "PageCheck", "PageChecker", "check_pages"]


def chromium_executable() -> Optional[str]:
    """Path of the system Chromium, or None when it is not installed."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


@dataclass
class PageCheck:
    """What the browser saw on one page."""

    path: Path
    title: str = ""
    console_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    broken_images: list[str] = field(default_factory=list)
    n_images: int = 0
    missing_sections: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)  # hrefs of <a> elements
    screenshot: Optional[Path] = None

    @property
    def problems(self) -> list[str]:
        return ([f"console error: {m}" for m in self.console_errors]
                + [f"failed request: {m}" for m in self.failed_requests]
                + [f"page error: {m}" for m in self.page_errors]
                + [f"image not decoded: {m}" for m in self.broken_images]
                + [f"missing section: #{m}" for m in self.missing_sections])

    @property
    def ok(self) -> bool:
        return not self.problems


class PageChecker:
    """One headless Chromium for many page checks (start it once; it takes a second or two)."""

    def __init__(self, executable: Optional[str] = None, viewport: tuple[int, int] = (1280, 900)) -> None:
        self.executable = executable or chromium_executable()
        if self.executable is None:
            raise FileNotFoundError("Chromium is not installed (looked for `chromium` on PATH and /usr/bin/chromium).")
        self.viewport = viewport
        self._pw: Any = None
        self._browser: Any = None

    def __enter__(self) -> "PageChecker":
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        try:
            self._browser = self._pw.chromium.launch(executable_path=self.executable, args=["--no-sandbox"])
        except BaseException:
            self._pw.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self._browser is not None:
                self._browser.close()
        finally:
            if self._pw is not None:
                self._pw.stop()
            self._browser = self._pw = None

    def check(self, path: Union[str, os.PathLike], *, sections: Sequence[str] = (),
              screenshot: Optional[Union[str, os.PathLike]] = None, full_page: bool = True) -> PageCheck:
        """Load ``path`` from disk (file://) and report what went wrong. ``sections``: element ids that must
        exist. ``screenshot``: where to save a PNG of the page."""
        if self._browser is None:
            raise RuntimeError("Use PageChecker as a context manager: `with PageChecker() as c: c.check(...)`.")
        path = Path(path).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"No page at {path}.")
        result = PageCheck(path=path)
        context = self._browser.new_context(viewport={"width": self.viewport[0], "height": self.viewport[1]})
        try:
            page = context.new_page()
            page.on("console", lambda m: result.console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: result.page_errors.append(str(e)))
            page.on("requestfailed", lambda r: result.failed_requests.append(f"{r.url[:120]} ({r.failure})"))
            response = page.goto(path.as_uri(), wait_until="load")
            if response is not None and not response.ok:
                result.failed_requests.append(f"{path} (status {response.status})")
            result.title = page.title()
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => [e.complete && e.naturalWidth > 0, (e.alt || '') + ' ' + e.src.slice(0, 40)])"
            )
            result.n_images = len(images)
            result.broken_images = [desc for ok, desc in images if not ok]
            result.links = page.eval_on_selector_all("a", "els => els.map(e => e.getAttribute('href'))")
            for sid in sections:
                if page.query_selector(f"[id='{sid}']") is None:
                    result.missing_sections.append(sid)
            if screenshot is not None:
                shot = Path(screenshot)
                shot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(shot), full_page=full_page)
                result.screenshot = shot
        finally:
            context.close()
        return result


def check_pages(paths: Sequence[Union[str, os.PathLike]], *, sections: Sequence[str] = (),
                screenshot_dir: Optional[Union[str, os.PathLike]] = None) -> list[PageCheck]:
    """Check several pages with one browser (see :meth:`PageChecker.check`)."""
    out = []
    with PageChecker() as checker:
        for p in paths:
            shot = Path(screenshot_dir) / (Path(p).stem + ".png") if screenshot_dir is not None else None
            out.append(checker.check(p, sections=sections, screenshot=shot))
    return out
