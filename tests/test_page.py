"""The status page at ``GET /`` in a real browser: Debian's Chromium, headless,
driven by Playwright. Each state is written as a screenshot to
``build/test-output/page/`` (or ``$MLXD_TEST_OUTPUT``)."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Locator, expect, sync_playwright

from config.settings import ModelConfig
from tests.conftest import TLS, Daemon, serving, settings_for
from tests.scripted import talking_model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium (apt-get install chromium; .ci/run installs it)"
)
OUTPUT = Path(
    os.environ.get("MLXD_TEST_OUTPUT", Path(__file__).parents[1] / "build" / "test-output")
)
KEY = "sk-page-test"
WAIT_MS = 60_000  # a loaded 2-core machine: conditions, not sleeps, bound every wait


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def daemon(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    work = tmp_path_factory.mktemp("page")
    slow = talking_model(tiny_dir, work / "slow", step_s=0.05)  # 20 tokens a second
    fast = talking_model(tiny_dir, work / "fast")
    broken = work / "broken"  # the tiny model without its weights: its load fails
    shutil.copytree(tiny_dir, broken, ignore=shutil.ignore_patterns("*.safetensors*"))
    models = (
        ModelConfig("slow", str(slow)),
        ModelConfig("fast", str(fast)),
        ModelConfig("broken", str(broken)),
    )
    with serving(settings_for(work, *models)) as d:
        yield d


class Page:
    """A tab on the status page that records what the console says."""

    def __init__(self, browser: Browser, url: str, **context: object) -> None:
        self.context = browser.new_context(**context)  # type: ignore[arg-type]
        self.tab = self.context.new_page()
        self.tab.set_default_timeout(WAIT_MS)
        self.problems: list[str] = []
        self.tab.on("console", self._console)
        self.tab.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.tab.goto(url)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            self.problems.append(f"console {message.type}: {message.text}")

    def card(self, model: str) -> Locator:
        return self.tab.locator(f'article.model[data-model="{model}"]')

    def shot(self, name: str) -> None:
        OUTPUT.joinpath("page").mkdir(parents=True, exist_ok=True)
        self.tab.screenshot(path=OUTPUT / "page" / f"{name}.png", full_page=True)

    def close(self) -> None:
        self.context.close()
        assert self.problems == []


def ps(daemon: Daemon, key: str | None = None) -> dict[str, dict]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    pool = httpx.get(f"{daemon.url}/api/ps", headers=headers, timeout=30, verify=TLS).json()
    return {m["model"]: m for m in pool["models"]}


def test_the_page_shows_the_models_the_budget_and_a_request_from_start_to_end(
    browser: Browser, daemon: Daemon
) -> None:
    page = Page(browser, daemon.url)
    for name in ("slow", "fast"):
        expect(page.card(name).locator(".badge").first).to_have_text("absent")
    expect(page.tab.locator("#budget-text")).to_contain_text("in use")
    expect(page.tab.locator("#no-requests")).to_be_visible()
    page.shot("idle")

    answer: list[httpx.Response] = []
    body = {"model": "slow", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 60}
    asking = threading.Thread(
        target=lambda: answer.append(
            httpx.post(
                f"{daemon.url}/v1/chat/completions",
                json=body,
                headers={"X-Mlxd-Client": "editor"},
                timeout=120,
                verify=TLS,
            )
        )
    )
    asking.start()
    try:
        slow = page.card("slow")
        expect(slow.locator(".badge").first).to_have_text("ready")
        expect(slow.locator("dt:text-is('Running') + dd")).to_have_text("1")
        expect(slow.locator(".clients")).to_have_text("editor (normal): 1 running, 0 queued")
        expect(page.tab.locator("#budget-legend")).to_contain_text("slow")
        page.shot("running")
    finally:
        asking.join(timeout=120)
    assert answer and answer[0].status_code == 200, answer
    row = page.tab.locator("#requests tbody tr").first
    expect(row.locator("td").nth(1)).to_have_text("slow")
    expect(row.locator("td").nth(2)).to_have_text("editor")
    expect(row.locator("td").nth(4)).to_have_text("200")
    expect(row.locator("td").nth(8)).to_have_text(
        str(answer[0].json()["usage"]["completion_tokens"])
    )
    # The tokens, sampled: the chart has a point above its baseline (the latest
    # sample may be 0 again by now, on a slow machine).
    page.tab.wait_for_function(
        """() => document.querySelector("#tps-chart polyline").getAttribute("points")
            .split(" ").some((xy) => parseFloat(xy.split(",")[1]) < 57.9)""",
        timeout=WAIT_MS,
    )
    expect(slow.locator("dt:text-is('Running') + dd")).to_have_text("0")
    page.shot("after-a-request")
    page.close()


def test_its_buttons_pin_and_unload_and_work_from_the_keyboard(
    browser: Browser, daemon: Daemon
) -> None:
    page = Page(browser, daemon.url)
    fast = page.card("fast")
    fast.get_by_role("button", name="Pin fast").click()
    expect(fast.locator(".badge").first).to_have_text("ready")
    expect(fast).to_contain_text("pinned")
    assert ps(daemon)["fast"]["pinned"] is True
    page.shot("pinned")

    unpin = fast.get_by_role("button", name="Unpin fast")
    unpin.focus()
    page.tab.keyboard.press("Enter")
    expect(fast.get_by_role("button", name="Pin fast")).to_be_visible()
    assert ps(daemon)["fast"]["pinned"] is False

    fast.get_by_role("button", name="Unload fast").click()
    expect(fast.locator(".badge").first).to_have_text("absent")
    assert ps(daemon)["fast"]["state"] == "absent"
    expect(page.tab.locator("#action-status")).to_have_text("unload fast: done")
    actions = page.tab.locator("#requests tbody tr td:nth-child(4)")
    expect(actions.first).to_have_text("/api/unload")
    expect(page.tab.locator("#requests tbody tr").first.locator("td").nth(1)).to_have_text("fast")
    page.close()


def test_a_failed_load_says_why_beside_its_button_and_among_the_errors(
    browser: Browser, daemon: Daemon
) -> None:
    page = Page(browser, daemon.url)
    page.card("broken").get_by_role("button", name="Load broken").click()
    status = page.tab.locator("#action-status")
    expect(status).to_contain_text("load broken failed: ")
    expect(status).to_contain_text("No safetensors found")
    expect(page.tab.locator("#errors li").first).to_contain_text("'broken' failed to load")
    expect(page.card("broken").locator(".badge").first).to_have_text("absent")
    page.shot("a-failed-load")
    # The browser logs the failed call's status, and nothing else.
    assert len(page.problems) == 1 and "status of 500" in page.problems[0], page.problems
    page.problems.clear()
    page.close()


@pytest.mark.parametrize(
    "looks",
    [
        {"viewport": {"width": 390, "height": 844}, "color_scheme": "dark"},
        {"viewport": {"width": 1280, "height": 800}, "color_scheme": "light"},
    ],
    ids=["phone-dark", "laptop-light"],
)
def test_it_fits_a_phone_and_a_laptop_in_light_and_dark(
    browser: Browser, daemon: Daemon, looks: dict
) -> None:
    page = Page(browser, daemon.url, **looks)
    expect(page.card("slow")).to_be_visible()
    overflow = page.tab.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow} px wider than the screen"
    background = page.tab.evaluate("getComputedStyle(document.body).backgroundColor")
    dark = looks["color_scheme"] == "dark"
    assert (background == "rgb(20, 20, 22)") == dark, background
    page.shot("phone-dark" if dark else "laptop-light")
    page.close()


def test_with_api_keys_it_shows_nothing_until_a_key_and_keeps_it_in_the_tab(
    browser: Browser, tiny_dir: Path, tmp_path: Path
) -> None:
    model = ModelConfig("secret-model", str(talking_model(tiny_dir, tmp_path / "m")))
    with serving(settings_for(tmp_path, model, api_keys=(KEY,))) as keyed:
        page = Page(browser, keyed.url)
        expect(page.tab.locator("#key-form")).to_be_visible()
        assert "secret-model" not in page.tab.content()
        page.shot("key-asked")
        page.tab.fill("#key", "sk-wrong")
        page.tab.press("#key", "Enter")
        expect(page.tab.locator("#key-error")).to_have_text("That key was not accepted.")
        assert "secret-model" not in page.tab.content()
        page.problems.clear()  # the browser logs the 401s the wrong key got

        page.tab.fill("#key", KEY)
        page.tab.get_by_role("button", name="Use key").click()
        expect(page.card("secret-model")).to_be_visible()
        expect(page.tab.locator("#key-form")).to_be_hidden()
        assert page.context.cookies() == []
        assert KEY not in page.tab.url
        stored = page.tab.evaluate("[localStorage.length, sessionStorage.getItem('mlxd-key')]")
        assert stored == [0, KEY]
        page.card("secret-model").get_by_role("button", name="Load secret-model").click()
        expect(page.card("secret-model").locator(".badge").first).to_have_text("ready")
        assert ps(keyed, KEY)["secret-model"]["state"] == "ready"
        page.shot("key-given")
    # The daemon has stopped: the page says so, and keeps what it last knew.
    expect(page.tab.locator("#live")).to_contain_text("not answering")
    page.shot("daemon-gone")
    page.problems.clear()  # the browser logs each refused connection
    page.close()
