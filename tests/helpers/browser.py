"""A headless Chromium for tests that look at web UIs (MLflow's, Prefect's): Selenium driving
Debian's chromium and chromedriver. Every wait polls the rendered page (both UIs are single-page
apps that fill in after their API calls), and a failed wait says what was on screen."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")

CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1600,1000",
                  "--disable-dev-shm-usage")  # /dev/shm is small in containers; Chromium's tabs crash there
SHOWN_CHARS = 3000  # of the page's visible text in a failure message

# The innermost visible element (under the CSS selector `scope`, or anywhere) whose visible text is
# `text` (or starts with it, `prefix`), preferring the link, tab or button around it: single-page
# apps render tabs as divs with roles or as plain spans, and a link's text may sit in a span.
_FIND_BY_TEXT = """
const [text, scope, prefix] = arguments;
const visible = (el) => el.getClientRects().length > 0 && getComputedStyle(el).visibility !== 'hidden';
const norm = (s) => (s || '').replace(/\\s+/g, ' ').trim();
const matches = (el) => prefix ? norm(el.innerText).startsWith(text) : norm(el.innerText) === text;
let best = null;
for (const root of scope ? document.querySelectorAll(scope) : [document.body]) {
  for (const el of root.querySelectorAll('*')) {
    if (!matches(el) || !visible(el)) continue;
    if (best === null || best.contains(el)) best = el;
  }
}
if (best === null) return null;
const clickable = best.closest('a, button, [role=tab], [role=button], [role=link], [role=menuitem], [role=treeitem]');
return clickable && matches(clickable) ? clickable : best;
"""

# The smallest element around arguments[0] that shows more than it does: a label with its value, a
# heading with its section.
_AROUND = """
const norm = (s) => (s || '').replace(/\\s+/g, ' ').trim();
const own = norm(arguments[0].innerText);
let el = arguments[0];
while (el.parentElement && norm(el.innerText) === own) el = el.parentElement;
return el.innerText;
"""


def missing_programs() -> list[str]:
    """The system programs a Browser needs that are not on PATH."""
    return [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]


class Browser:
    """One headless Chromium window. `timeout`: seconds a wait polls before it fails."""

    def __init__(self, timeout: float = 60.0, poll: float = 0.5):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        # both paths given: Selenium Manager (which would try to download a driver) is not consulted
        self.driver = webdriver.Chrome(options=options, service=Service(executable_path=shutil.which("chromedriver")))
        self.timeout = timeout
        self.poll = poll

    def close(self) -> None:
        self.driver.quit()

    # ------------------------------------------------------------------ reading the page

    def visible_text(self) -> str:
        """What a person sees on the page, as text (hidden elements left out)."""
        from selenium.common.exceptions import WebDriverException

        try:
            return self.driver.find_element("tag name", "body").text
        except WebDriverException:  # between two pages there is no body yet
            return ""

    def describe(self) -> str:
        """The page's address and visible text (blank lines dropped, trimmed), for failure messages."""
        lines = [line.strip() for line in self.visible_text().splitlines() if line.strip()]
        text = "\n".join(lines)
        if len(text) > SHOWN_CHARS:
            text = text[:SHOWN_CHARS] + f"\n... ({len(text) - SHOWN_CHARS} more characters)"
        return f"page {self.driver.current_url} shows:\n{text}"

    def fail(self, message: str) -> None:
        raise AssertionError(f"{message}\n{self.describe()}")

    # ------------------------------------------------------------------ waiting

    def wait_until(self, found: Callable[[], T | None], what: str, timeout: float | None = None) -> T:
        """Poll `found()` until it returns something truthy (returned); fail saying `what` was awaited."""
        from selenium.common.exceptions import WebDriverException

        seconds = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + seconds
        while True:
            try:
                value = found()
            except WebDriverException:  # e.g. an element re-rendered while it was read
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                self.fail(f"waited {seconds:.0f} s for {what}")
            time.sleep(self.poll)

    def wait_for_text(self, *texts: str, timeout: float | None = None) -> None:
        """Wait until every one of `texts` is visible somewhere on the page."""
        def shown() -> bool:
            page = self.visible_text()
            return all(text in page for text in texts)

        self.wait_until(shown, "the text " + ", ".join(repr(t) for t in texts), timeout)

    def open(self, url: str, *texts: str, timeout: float | None = None) -> None:
        """Load `url` and wait until `texts` are visible."""
        self.driver.get(url)
        self.wait_for_text(*texts, timeout=timeout)

    # ------------------------------------------------------------------ acting

    def element_with_text(self, text: str, within: str | None = None, prefix: bool = False,
                          timeout: float | None = None):
        """The visible element (preferably a link, tab or button) whose visible text is exactly `text`
        (starts with it: `prefix`), under the elements matching the CSS selector `within` if given."""
        where = f" under {within}" if within else ""
        return self.wait_until(lambda: self.driver.execute_script(_FIND_BY_TEXT, text, within, prefix),
                               f"an element reading {'' if prefix else 'exactly '}{text!r}{where}", timeout)

    def text_around(self, label: str, within: str | None = None, prefix: bool = False,
                    timeout: float | None = None) -> str:
        """The visible text of the label or heading reading `label` together with what it labels
        (its value, its section), label included: e.g. 'Child runs\\nevaluate, train_online'."""
        element = self.element_with_text(label, within, prefix, timeout)
        return self.driver.execute_script(_AROUND, element)

    def click(self, text: str, within: str | None = None, timeout: float | None = None) -> None:
        """Click the link, tab or button whose visible text is exactly `text`."""
        from selenium.common.exceptions import ElementClickInterceptedException, StaleElementReferenceException

        def clicked() -> bool:
            element = self.element_with_text(text, within, timeout=timeout)
            try:
                element.click()
            except ElementClickInterceptedException:  # a tooltip or overlay over it: click it where it is
                self.driver.execute_script("arguments[0].click();", element)
            except StaleElementReferenceException:  # re-rendered between finding and clicking: find it again
                return False
            return True

        self.wait_until(clicked, f"a click on {text!r}", timeout)

    def scroll_to(self, element) -> None:
        """Bring `element` to the middle of the window (pages render some parts only once in view)."""
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)

    def screenshot(self, path: Path) -> Path:
        """Save what the window shows as a PNG."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not self.driver.save_screenshot(str(path)):
            self.fail(f"could not save a screenshot to {path}")
        return path
