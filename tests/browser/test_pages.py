"""The playground (/ui/) and the fleet dashboard (/dashboard/) in a real headless Chromium, against the real
stack: two dummy:tiny CPU workers (fp4 and bf16) behind nginx, API keys on (see conftest.py).

The tests share one stack and one browser and run in file order; the last one kills a worker.
Screenshots: test-artifacts/screenshots/<test>.png.
"""
from __future__ import annotations

import json
import os
import re
import signal

import pytest

pytest.importorskip("selenium")

from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.browser.conftest import API_KEY

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

# Long enough to hold a worker's only slot (FLUX_MAX_CONCURRENT=1) while a test looks at the queue;
# the test cancels it after a few steps.
BLOCKER = {"prompt": "hold the worker", "width": 1024, "height": 1024, "num_inference_steps": 100, "seed": 1}


def wait(browser, timeout: float = 20):
    return WebDriverWait(browser, timeout, poll_frequency=0.05, ignored_exceptions=[StaleElementReferenceException])


def copy_as_curl(browser) -> str:
    """Presses "Copy as curl" and returns what it copied (the copy is asynchronous: the clipboard API is tried
    first, then the textarea fallback)."""
    browser.execute_script("window.lastCopied = null")
    browser.find_element(By.ID, "copy-curl").click()
    return wait(browser).until(lambda d: d.execute_script("return window.lastCopied"))


def open_ui(browser, stack, key: str | None = API_KEY):
    browser.get(f"{stack.url}/ui/")
    browser.execute_script("sessionStorage.clear(); localStorage.clear();")
    browser.get(f"{stack.url}/ui/")
    field = browser.find_element(By.ID, "api-key")
    if key:
        field.send_keys(key, Keys.ENTER)
        wait(browser).until(lambda d: d.execute_script("return sessionStorage.getItem('flux.apiKey')") == key)
    wait(browser).until(lambda d: "ready" in d.find_element(By.ID, "service").text)


def fill(browser, element_id: str, value) -> None:
    el = browser.find_element(By.ID, element_id)
    el.clear()
    el.send_keys(str(value))


def alert_text(browser) -> str:
    box = wait(browser).until(EC.visibility_of_element_located((By.ID, "error")))
    return box.text


def meta_value(browser, label: str) -> str | None:
    return browser.execute_script(
        "const dt = [...document.querySelectorAll('#result-meta dt')].find(e => e.textContent === arguments[0]);"
        "return dt ? dt.nextElementSibling.textContent : null;", label)


def worker_stats(stack) -> list[dict]:
    return [stack.request("GET", f"http://127.0.0.1:{p}/queue-stats")[1] for p in stack.ports]


def test_generate_shows_moving_progress_then_the_image(stack, browser, shot):
    open_ui(browser, stack)
    fill(browser, "prompt", "a lighthouse at dusk, volumetric light")
    fill(browser, "width", 384)
    fill(browser, "height", 384)
    assert Select(browser.find_element(By.ID, "size-preset")).first_selected_option.get_attribute("value") == "custom"
    # this API has no LoRA list and no input-image fields: their controls stay hidden
    assert not browser.find_element(By.ID, "lora-field").is_displayed()
    assert not browser.find_element(By.ID, "image-field").is_displayed()
    fill(browser, "steps", 28)
    fill(browser, "seed", 1234)
    # every value the progress bar takes, recorded in the page as it changes
    browser.execute_script("""
        window.__progress = [];
        new MutationObserver(() => window.__progress.push(
            Number(document.getElementById('progress').getAttribute('aria-valuenow'))))
          .observe(document.getElementById('progress'), {attributes: true, attributeFilter: ['aria-valuenow']});
    """)
    browser.find_element(By.ID, "generate").click()
    wait(browser, 60).until(lambda d: d.execute_script(
        "const i = document.getElementById('result-img'); return !document.getElementById('result').hidden"
        " && i.complete && i.naturalWidth > 0"))
    seen = browser.execute_script("return window.__progress")
    intermediate = [v for v in seen if 0 < v < 100]
    assert intermediate, f"the progress bar never showed a step between start and end: {seen}"
    assert seen[-1] == 100
    assert browser.execute_script("return document.getElementById('result-img').naturalWidth") == 384
    meta = browser.find_element(By.ID, "result-meta").text
    assert "1234" in meta and "384 × 384" in meta and "28" in meta
    shot()

    # copy as curl: the same body, the key named by a variable and never written out
    curl = copy_as_curl(browser)
    assert f"{stack.url}/jobs" in curl and API_KEY not in curl and "$FLUX_API_KEY" in curl
    body = json.loads(curl.split("-d '", 1)[1].rsplit("'", 1)[0])
    assert body == {"prompt": "a lighthouse at dusk, volumetric light", "width": 384, "height": 384,
                    "num_inference_steps": 28, "seed": 1234}

    # the history keeps it across a reload, and "use settings" brings the request back
    browser.refresh()
    items = wait(browser).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#history li"))
    assert len(items) == 1
    items[0].find_element(By.XPATH, ".//button[normalize-space()='Use settings']").click()
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "a lighthouse at dusk, volumetric light"
    assert browser.find_element(By.ID, "width").get_attribute("value") == "384"
    assert browser.find_element(By.ID, "seed").get_attribute("value") == "1234"


def test_cancel_a_queued_job(stack, browser, shot):
    blockers = []
    try:
        for port in stack.ports:  # every worker busy: the next job has to wait
            status, job = stack.request("POST", f"http://127.0.0.1:{port}/jobs", BLOCKER)
            assert status == 202, job
            blockers.append(job["job_id"])
        before = sum(s["cancelled"] for s in worker_stats(stack))
        open_ui(browser, stack)
        fill(browser, "prompt", "a job that will wait")
        Select(browser.find_element(By.ID, "size-preset")).select_by_value("256x256")
        fill(browser, "steps", 2)
        browser.find_element(By.ID, "generate").click()
        wait(browser).until(lambda d: d.find_element(By.ID, "job-state").text == "queued")
        assert "Position 1" in browser.find_element(By.ID, "job-detail").text
        shot("queued")
        browser.find_element(By.ID, "cancel").click()
        wait(browser).until(lambda d: d.find_element(By.ID, "job-state").text == "cancelled")
        assert browser.find_element(By.ID, "result").get_attribute("hidden") is not None
        assert not browser.find_element(By.ID, "generate").get_attribute("disabled")
        after = sum(s["cancelled"] for s in worker_stats(stack))
        assert after == before + 1
        shot()
    finally:
        for job_id in blockers:
            stack.request("DELETE", f"{stack.url}/jobs/{job_id}")


def test_a_reload_picks_up_the_running_job(stack, browser, shot):
    open_ui(browser, stack)
    fill(browser, "prompt", "a job that survives a reload")
    fill(browser, "width", 384)
    fill(browser, "height", 384)
    fill(browser, "steps", 36)
    browser.find_element(By.ID, "generate").click()
    wait(browser).until(lambda d: d.find_element(By.ID, "job-state").text == "running")
    browser.refresh()
    wait(browser).until(lambda d: d.find_element(By.ID, "job-state").text in ("queued", "running", "succeeded"))
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "a job that survives a reload"
    wait(browser, 60).until(lambda d: d.find_element(By.ID, "job-state").text == "succeeded"
                            and d.find_element(By.ID, "result").is_displayed())
    assert meta_value(browser, "Size") == "384 × 384"
    assert browser.execute_script("return sessionStorage.getItem('flux.activeJob')") is None


def test_full_queue_shows_the_servers_retry_after(stack, browser, shot):
    held = []
    try:
        for port in stack.ports:  # each worker: one running, one waiting (FLUX_MAX_QUEUE_SIZE=1)
            for _ in range(2):
                status, job = stack.request("POST", f"http://127.0.0.1:{port}/jobs", BLOCKER)
                assert status == 202, job
                held.append(job["job_id"])
        open_ui(browser, stack)
        fill(browser, "prompt", "one too many")
        Select(browser.find_element(By.ID, "size-preset")).select_by_value("256x256")
        browser.find_element(By.ID, "generate").click()
        text = alert_text(browser)
        assert "The service is busy" in text and "queue_full" in text
        assert re.search(r"Retry after \d+ s", text), text
        shot()
    finally:
        for job_id in reversed(held):
            stack.request("DELETE", f"{stack.url}/jobs/{job_id}")


def test_precision_route_in_a_mixed_deployment(stack, browser, shot):
    open_ui(browser, stack)
    route = browser.find_element(By.ID, "route")
    wait(browser).until(lambda d: route.is_displayed())
    for choice, precision in (("quality", "bf16"), ("fast", "fp4")):
        Select(route).select_by_value(choice)
        fill(browser, "prompt", f"a {choice} render")
        Select(browser.find_element(By.ID, "size-preset")).select_by_value("256x256")
        fill(browser, "steps", 2)
        browser.find_element(By.ID, "generate").click()
        wait(browser, 60).until(lambda d: d.find_element(By.ID, "job-state").text == "succeeded"
                                and d.find_element(By.ID, "result").is_displayed()
                                and f"a {choice} render" in d.find_element(By.ID, "result-img").get_attribute("alt"))
        assert meta_value(browser, "Precision") == precision
        assert f"{stack.url}/generate/{choice} " in copy_as_curl(browser)
    shot()


def test_html_in_a_prompt_is_text_and_use_again_restores_the_route(stack, browser, shot):
    """A prompt holding markup is shown as text in the result and the history (nothing of it runs or becomes
    an element); "Use settings" of a history entry brings back its prompt, seed and precision route."""
    open_ui(browser, stack)
    route = browser.find_element(By.ID, "route")
    wait(browser).until(lambda d: route.is_displayed())
    prompt = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script> it\'s "quoted"'
    Select(route).select_by_value("quality")
    fill(browser, "prompt", prompt)
    Select(browser.find_element(By.ID, "size-preset")).select_by_value("256x256")
    fill(browser, "steps", 1)
    browser.find_element(By.ID, "generate").click()
    wait(browser, 60).until(lambda d: d.find_element(By.ID, "job-state").text == "succeeded"
                            and len(d.find_elements(By.CSS_SELECTOR, "#history li")) == 1)
    assert browser.execute_script("return window.pwned") is None
    assert browser.find_element(By.CSS_SELECTOR, "#history li p").text == prompt
    injected = "return document.querySelectorAll('#history script, #history img[src=x]').length"
    assert browser.execute_script(injected) == 0
    seed = meta_value(browser, "Seed")
    Select(route).select_by_value("fast")
    fill(browser, "prompt", "something else")
    browser.find_element(By.CSS_SELECTOR, "#history li .actions button").click()
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == prompt
    assert browser.find_element(By.ID, "seed").get_attribute("value") == seed
    assert Select(route).first_selected_option.get_attribute("value") == "quality"
    shot()


def test_a_stored_history_the_page_cannot_read_does_not_break_it(stack, browser, shot):
    """Whatever is under the history's key (another version of the page, a hand edit) is left out, never a
    page that stops at start-up; an entry whose image URL is not http(s) is not shown."""
    good = {"body": {"prompt": "kept", "width": 256, "height": 256}, "route": "",
            "result": {"image_url": f"{stack.url}/images/{'0' * 32}.png", "width": 256, "height": 256, "seed": 7},
            "at": 0}
    bad_url = dict(good, body={"prompt": "dropped"}, result=dict(good["result"], image_url="javascript:alert(1)"))
    for stored in ('{"a": 1}', "[null, 5, {}]", json.dumps([{"x": 1}, bad_url, good]), "not json"):
        open_ui(browser, stack)
        browser.execute_script("localStorage.setItem('flux.history', arguments[0])", stored)
        browser.get(f"{stack.url}/ui/")
        wait(browser).until(lambda d: "ready" in d.find_element(By.ID, "service").text)  # start-up went through
        texts = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#history li p")]
        assert texts == (["kept"] if "kept" in stored else []), (stored, texts)
    shot()


def test_bad_input_shows_the_servers_message(stack, browser, shot):
    open_ui(browser, stack)
    fill(browser, "prompt", "a red cube")
    fill(browser, "width", 520)
    fill(browser, "height", 512)
    browser.find_element(By.ID, "generate").click()
    text = alert_text(browser)
    assert "width: must be a multiple of 16" in text  # the server's own words
    assert "refused" in text
    assert browser.find_element(By.ID, "width").get_attribute("aria-invalid") == "true"
    shot()


def test_key_required_when_keys_are_on(stack, browser, shot):
    open_ui(browser, stack, key=None)
    fill(browser, "prompt", "a red cube")
    Select(browser.find_element(By.ID, "size-preset")).select_by_value("256x256")
    fill(browser, "steps", 1)
    browser.find_element(By.ID, "generate").click()
    text = alert_text(browser)
    assert "API key is required" in text and "a valid API key is required" in text
    assert browser.switch_to.active_element.get_attribute("id") == "api-key"
    shot("401")

    browser.find_element(By.ID, "api-key").send_keys(API_KEY, Keys.ENTER)
    wait(browser).until(lambda d: not d.find_element(By.ID, "error").is_displayed())
    browser.find_element(By.ID, "generate").click()
    wait(browser, 60).until(lambda d: d.find_element(By.ID, "job-state").text == "succeeded")
    assert browser.find_element(By.ID, "result").is_displayed()


def test_phone_width_has_no_sideways_scrolling(stack, browser, shot):
    browser.set_window_size(390, 844)
    try:
        for page in ("ui", "dashboard"):
            browser.get(f"{stack.url}/{page}/")
            wait(browser).until(lambda d: d.execute_script("return document.readyState") == "complete")
            if page == "dashboard":
                wait(browser).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#workers tbody tr")) == 2)
            overflow = browser.execute_script(
                "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
            assert overflow <= 0, f"/{page}/ scrolls sideways by {overflow}px at phone width"
            shot(page)
    finally:
        browser.set_window_size(1280, 900)


def dashboard_cell(browser, worker: int | str, key: str) -> str | None:
    # read in one script: the table is redrawn every poll, so element handles go stale
    return browser.execute_script(
        "const c = document.querySelector(`#workers tr[data-worker='${arguments[0]}'] td[data-k='${arguments[1]}']`);"
        "return c ? c.textContent.trim() : null;", str(worker), key)


def test_dashboard_lists_every_worker_and_counts_rise(stack, browser, shot):
    browser.get(f"{stack.url}/dashboard/")
    wait(browser).until(lambda d: all(dashboard_cell(d, p, "state") == "ready" for p in stack.ports))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#workers tbody tr")) == len(stack.ports)
    for port, precision in zip(stack.ports, stack.precisions):
        assert dashboard_cell(browser, port, "model") == "dummy:tiny"
        assert dashboard_cell(browser, port, "precision") == precision
    assert browser.find_element(By.ID, "t-up").text == f"{len(stack.ports)} / {len(stack.ports)}"
    before = int(browser.find_element(By.ID, "t-completed").text)
    status, result = stack.request("POST", f"{stack.url}/generate",
                                   {"prompt": "a secret prompt", "width": 256, "height": 256, "num_inference_steps": 1})
    assert status == 200, result
    wait(browser).until(lambda d: int(d.find_element(By.ID, "t-completed").text) == before + 1)
    owner = result["job_id"].split("-")[0]
    wait(browser).until(lambda d: int(dashboard_cell(d, owner, "ipm") or 0) >= 1)
    assert "a secret prompt" not in browser.page_source  # never shows prompts
    assert browser.find_element(By.ID, "t-conn").text not in ("", "–")

    # a failure (a request past its deadline) shows in the errors of the last minutes
    status, job = stack.request("POST", f"http://127.0.0.1:{stack.ports[0]}/jobs", dict(BLOCKER, timeout_s=0.5))
    assert status == 202, job
    wait(browser, 30).until(lambda d: d.find_element(By.ID, "t-errors").text == "1")
    assert f"worker {stack.ports[0]}: 1 request failed" in browser.find_element(By.ID, "events").text
    assert dashboard_cell(browser, stack.ports[0], "failed") == "1 (+1)"
    shot()


def test_dashboard_starts_whatever_its_stored_figures_hold(stack, browser, shot):
    """The charts' figures kept in the browser may be anything (another version of the page, a hand edit):
    the dashboard starts afresh rather than stop before its first poll."""
    for stored in ("null", "5", '{"%s": [{"t": "x"}, null, {"t": 1e20, "ipm": "a", "depth": {}}]}' % stack.ports[0]):
        browser.get(f"{stack.url}/dashboard/")
        browser.execute_script("localStorage.setItem('flux.dashboard.series', arguments[0])", stored)
        browser.get(f"{stack.url}/dashboard/")
        wait(browser).until(lambda d: all(dashboard_cell(d, p, "state") == "ready" for p in stack.ports))
    browser.execute_script("localStorage.removeItem('flux.dashboard.series')")
    shot()


def test_dashboard_shows_a_killed_worker_as_down(stack, browser, shot):
    browser.get(f"{stack.url}/dashboard/")
    wait(browser).until(lambda d: dashboard_cell(d, stack.ports[1], "state") == "ready")
    os.kill(stack.worker_pid(1), signal.SIGKILL)
    wait(browser).until(lambda d: dashboard_cell(d, stack.ports[1], "state") == "down")
    assert dashboard_cell(browser, stack.ports[0], "state") == "ready"
    assert browser.find_element(By.ID, "t-up").text == f"1 / {len(stack.ports)}"
    assert f"worker {stack.ports[1]} is down" in browser.find_element(By.ID, "events").text
    shot()
