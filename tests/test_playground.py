"""The playground page (/playground) in a real headless browser (Debian's chromium driven by
selenium) against a real gateway over HTTP with an API key set: on the fake engine (fast), and
on the real engine (`engine` tier), which also makes the screenshots in docs/images when
VBON_PLAYGROUND_SCREENSHOTS names a folder:

    VBON_PLAYGROUND_SCREENSHOTS=docs/images .venv/bin/python -m pytest -q -m engine \\
        tests/test_playground.py
"""

from __future__ import annotations

import fnmatch
import os
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.routers.playground import FILES, PLAYGROUND_DIR
from server.settings import ServerSettings
from tests.adapters_util import make_fake_adapter
from tests.fakes import FakeBackend
from tests.server_proc import ROOT, ServerProcess, serve_in_thread
from vbon.settings import load_settings

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
KEY = "playground-test-key-0123456789"
MAX_N = 16


# -- browser helpers --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        # Not a skip: scripts/install.sh installs them on the machines the suite runs on.
        pytest.fail(
            f"{', '.join(missing)} missing: run scripts/install.sh as root (it installs "
            "Debian's chromium and chromium-driver) or `apt-get install chromium chromium-driver`"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    # With both paths given selenium needs no download (Selenium Manager is not called).
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    yield driver
    driver.quit()


def wait_for(driver: Any, cond: Any, timeout: float = 60) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(cond)


def by_css(driver: Any, css: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def one(driver: Any, css: str) -> Any:
    found = by_css(driver, css)
    assert len(found) == 1, f"{css}: {len(found)} elements"
    return found[0]


def fill(driver: Any, css: str, value: str) -> None:
    box = one(driver, css)
    box.clear()
    box.send_keys(value)


def open_page(driver: Any, url: str, key: str) -> None:
    """Load the page (the browser sends no key), then give it the key."""
    driver.get(url + "/playground")
    driver.execute_script("sessionStorage.clear()")
    # A new navigation, not a reload: a reload may restore the previous form values.
    driver.get(url + "/playground")
    status = one(driver, "#server-status")
    # Without the key, the page shows the server's 401 message.
    wait_for(driver, lambda d: "API key" in status.text)
    fill(driver, "#api-key", key)
    one(driver, "#save-key").click()
    wait_for(driver, lambda d: status.text.startswith("connected"))


def states(driver: Any) -> dict[str, str]:
    return {
        card: one(driver, f"#{card} .out").get_attribute("data-state") or ""
        for card in ("bon", "vbon", "pruned")
    }


def run_compare(driver: Any, n: str, prompt: str | None = None, kind: str = "chat") -> None:
    from selenium.webdriver.support.ui import Select

    one(driver, "#tab-compare").click()
    if prompt is not None:
        fill(driver, "#prompt", prompt)
    Select(one(driver, "#prompt-kind")).select_by_value(kind)
    fill(driver, "#n", n)
    # Forget the last run's states, so that the wait below sees this run's.
    driver.execute_script("for (const o of document.querySelectorAll('.out')) o.dataset.state=''")
    one(driver, "#run").click()
    wait_for(driver, lambda d: all(s in ("ok", "error") for s in states(d).values()), 300)


def metric(driver: Any, card: str, name: str) -> float:
    return float(one(driver, f"#{card} .summary .{name} .value").text)


def candidate_rows(driver: Any, card: str) -> list[dict[str, Any]]:
    return [
        {
            "rank": int(one(row, ".rank").text),
            "reward": float(one(row, ".reward").text),
            "tokens": int(one(row, ".tokens").text),
            "pruned": "pruned" in (row.get_attribute("class") or ""),
        }
        for row in by_css(driver, f"#{card} tr.cand")
    ]


def check_compare(driver: Any, n: int) -> None:
    """What a successful compare run must show: BoN-N's N candidates ranked by reward, the
    vBoN answer and the pruned answer, each with reward, tokens and both times."""
    assert states(driver) == {"bon": "ok", "vbon": "ok", "pruned": "ok"}, [
        e.text for e in by_css(driver, ".out .error")
    ]
    bon = candidate_rows(driver, "bon")
    assert [r["rank"] for r in bon] == list(range(1, n + 1))
    rewards = [r["reward"] for r in bon]
    assert rewards == sorted(rewards, reverse=True)
    assert metric(driver, "bon", "reward") == rewards[0]
    # usage counts every sample drawn, and every candidate is returned for plain BoN.
    assert metric(driver, "bon", "tokens") == sum(r["tokens"] for r in bon)
    assert one(driver, "#bon .answer").text.strip()
    for card in ("bon", "vbon", "pruned"):
        assert metric(driver, card, "tokens") > 0
        assert metric(driver, card, "server-s") >= 0 and metric(driver, card, "wall-s") > 0
    assert one(driver, "#vbon .answer").text.strip()
    assert re.search(rf"adapter \S+ v\d+ \(N={n}\)", one(driver, "#vbon .meta").text)
    pruned = candidate_rows(driver, "pruned")
    shown = int(re.match(r"(\d+) of (\d+) pruned", one(driver, "#pruned .meta").text).group(1))
    assert len(pruned) == n and sum(r["pruned"] for r in pruned) == shown
    # Finished candidates rank before pruned ones.
    flags = [r["pruned"] for r in pruned]
    assert flags == sorted(flags)
    assert one(driver, "#pruned .answer").text.strip()


def run_throughput(driver: Any, n: str, k: str, c: str) -> None:
    one(driver, "#tab-throughput").click()
    fill(driver, "#tp-n", n)
    fill(driver, "#tp-k", k)
    fill(driver, "#tp-c", c)
    driver.execute_script("document.getElementById('tp-status').className = 'status'")
    one(driver, "#tp-run").click()
    status = one(driver, "#tp-status")
    wait_for(driver, lambda d: status.get_attribute("class") != "status", 300)


def throughput_rows(driver: Any) -> dict[str, list[str]]:
    return {
        row.get_attribute("data-method"): [td.text for td in by_css(row, "td")]
        for row in by_css(driver, "#tp-table tbody tr")
    }


def check_bars(driver: Any) -> None:
    bars = by_css(driver, "#tp-chart rect.bar")
    got = {(b.get_attribute("data-method"), b.get_attribute("data-metric")): b for b in bars}
    assert set(got) == {
        (m, k) for m in ("vbon", "bon") for k in ("answersPerS", "tokensPerS", "meanReward")
    }
    for (_, key), bar in got.items():
        if key != "meanReward":
            assert float(bar.get_attribute("data-value")) > 0
            assert float(bar.get_attribute("height")) > 1  # drawn, not the 1-pixel minimum


def screenshot(driver: Any, name: str) -> None:
    folder = os.environ.get("VBON_PLAYGROUND_SCREENSHOTS")
    if not folder:
        return
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, max(700, int(height) + 20))
    Path(folder).mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(Path(folder) / name))
    driver.set_window_size(1280, 1000)


# -- on the fake engine --------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, FakeBackend]]:
    adapters = tmp_path_factory.mktemp("playground") / "adapters"
    make_fake_adapter(adapters / "vbon-n4", n=4)
    make_fake_adapter(adapters / "vbon-n8", n=8)
    settings = ServerSettings(
        api_key=KEY, adapters_dir=adapters, adapter_poll_s=0, max_n=MAX_N, max_tokens_limit=64
    )
    fake = FakeBackend()
    app = create_app(settings, backend_factory=lambda s: fake, background_load=False)
    with serve_in_thread(app) as url:
        yield url, fake


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def test_page_loads_without_key_with_a_strict_csp(fake_gateway: tuple[str, FakeBackend]) -> None:
    url, _ = fake_gateway
    for path, name in [("/playground", "index.html"), ("/playground/", "index.html"),
                       *((f"/playground/{f}", f) for f in FILES)]:
        r = httpx.get(url + path)
        assert r.status_code == 200, (path, r.text)
        assert r.headers["content-type"] == FILES[name]
        assert r.content == (PLAYGROUND_DIR / name).read_bytes()
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
        assert "connect-src 'self'" in csp and "unsafe" not in csp
        assert r.headers["x-content-type-options"] == "nosniff"
    # Only the listed files, and only reading them, go without the key.
    r = httpx.get(url + "/playground/settings.py")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert httpx.post(url + "/playground", json={}).status_code == 401
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.get(url + "/v1/models", headers=auth()).status_code == 200


def test_compare_shows_ranked_candidates_vbon_and_pruned(
    browser: Any, fake_gateway: tuple[str, FakeBackend]
) -> None:
    url, fake = fake_gateway
    open_page(browser, url, KEY)
    assert browser.execute_script("return sessionStorage.getItem('vbon-playground-key')") == KEY
    before = len(fake.calls)
    run_compare(browser, "8")
    check_compare(browser, 8)
    # One BoN, one vBoN (through the adapter) and one pruned BoN reached the engine.
    calls = fake.calls[before:]
    assert sorted(c["lora"] is not None for c in calls).count(True) == 1
    assert all("Write a short review" in c["prompt"] for c in calls)
    run_compare(browser, "4")
    check_compare(browser, 4)


def test_bad_input_shows_the_servers_message(
    browser: Any, fake_gateway: tuple[str, FakeBackend]
) -> None:
    url, _ = fake_gateway
    open_page(browser, url, KEY)
    run_compare(browser, "1000")
    assert states(browser) == {"bon": "error", "vbon": "error", "pruned": "error"}
    msg = f"'n' is 1000; allowed: 1 <= n <= {MAX_N}"
    assert msg in one(browser, "#bon .error").text and msg in one(browser, "#pruned .error").text
    assert "no vBoN adapter for n=1000" in one(browser, "#vbon .error").text
    run_compare(browser, "8", prompt="   ", kind="text")
    for card in ("bon", "vbon", "pruned"):
        assert "400: " in one(browser, f"#{card} .error").text
        assert "'prompt' must not be empty" in one(browser, f"#{card} .error").text
    # A wrong key: the server's 401 message, on every card.
    open_page(browser, url, KEY)
    fill(browser, "#api-key", "wrong-key")
    one(browser, "#save-key").click()
    run_compare(browser, "8", prompt="A film")
    assert "missing or wrong API key" in one(browser, "#bon .error").text


def test_throughput_tab_runs_k_requests_and_draws_bars(
    browser: Any, fake_gateway: tuple[str, FakeBackend]
) -> None:
    url, fake = fake_gateway
    open_page(browser, url, KEY)
    before = len(fake.calls)
    run_throughput(browser, n="4", k="6", c="3")
    status = one(browser, "#tp-status")
    assert "ok" in status.get_attribute("class"), status.text
    calls = fake.calls[before:]
    assert [c["lora"] is not None for c in calls] == [True] * 6 + [False] * 6
    assert all(c["n"] == 4 for c in calls if c["lora"] is None)
    rows = throughput_rows(browser)
    assert rows["vbon"][:3] == ["vBoN-4", "6", "0"] and rows["bon"][:3] == ["BoN-4", "6", "0"]
    check_bars(browser)
    # K beyond the cap is refused by the page, before any request.
    before = len(fake.calls)
    run_throughput(browser, n="4", k="500", c="3")
    assert "allowed: 1 <= K <= 32" in status.text and "error" in status.get_attribute("class")
    assert len(fake.calls) == before


def test_playground_off_is_404(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VBON_PLAYGROUND", "false")
    settings = load_settings(ServerSettings, api_key=KEY, adapters_dir=tmp_path, adapter_poll_s=0)
    assert settings.playground is False
    app = create_app(settings, backend_factory=lambda s: FakeBackend(), background_load=False)
    with TestClient(app) as c:
        for path in ("/playground", "/playground/app.js"):
            assert c.get(path).status_code == 404
            assert c.get(path, headers=auth()).status_code == 404
        assert c.get("/v1/models", headers=auth()).status_code == 200


def test_page_uses_only_public_routes_and_local_files() -> None:
    js = (PLAYGROUND_DIR / "app.js").read_text()
    html = (PLAYGROUND_DIR / "index.html").read_text()
    called = set(re.findall(r"""["'](/[a-z0-9_/-]+)["']""", js))
    assert called >= {"/v1/bon", "/v1/vbon", "/v1/models"}
    app = create_app(ServerSettings(), backend_factory=lambda s: FakeBackend())
    schema_paths = set(app.openapi()["paths"])  # the documented (public) API
    assert called <= schema_paths, called - schema_paths
    assert not any(p.startswith("/admin") for p in called)
    # Everything the page loads comes from the gateway: no CDN, no other origin.
    refs = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
    assert refs and all(r.startswith("/playground/") and r[12:] in FILES for r in refs)
    for text in (js, html, (PLAYGROUND_DIR / "style.css").read_text()):
        urls = set(re.findall(r"https?://[^\s\"')]+", text))
        assert urls <= {"http://www.w3.org/2000/svg"}, urls  # (the SVG namespace, not a fetch)


def test_installed_package_ships_the_page() -> None:
    """pyproject's package-data must carry the files (the docker images install the wheel)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = config["package-data"]["server"]
    for name in FILES:
        rel = (PLAYGROUND_DIR / name).relative_to(ROOT / "server").as_posix()
        assert any(fnmatch.fnmatch(rel, p) for p in patterns), (rel, patterns)


# -- on the real engine -------------------------------------------------------------------


@pytest.mark.engine
def test_playground_on_the_real_engine(
    browser: Any, embedded_model: Path, tmp_path: Path
) -> None:
    """The page against `python -m server` on vLLM with the shipped vBoN adapters and VADER;
    with VBON_PLAYGROUND_SCREENSHOTS set, the screenshots of the docs."""
    proc = ServerProcess(
        {
            "VBON_API_KEY": KEY,
            "VBON_SHIPPED_ADAPTERS": "true",
            "VBON_ADAPTERS_DIR": str(tmp_path / "adapters"),
            "VBON_MODELS_DIR": str(embedded_model.parent),
        },
        tmp_path / "server.log",
    )
    try:
        open_page(browser, proc.url, KEY)
        fill(browser, "#max-tokens", "48")
        fill(browser, "#prune-at", "12")
        run_compare(browser, "8")
        check_compare(browser, 8)
        screenshot(browser, "playground.png")
        run_throughput(browser, n="8", k="8", c="4")
        assert "ok" in one(browser, "#tp-status").get_attribute("class")
        check_bars(browser)
        screenshot(browser, "playground-throughput.png")
    finally:
        proc.stop()
