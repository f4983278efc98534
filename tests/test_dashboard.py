"""The web dashboard (issue 14) as a person uses it: /ui/ in a real headless Chromium
(Debian's chromium and chromium-driver, driven by Selenium), against a real broker. Each
test saves a screenshot of what it ends on under build/screenshots/, and fails on any
error in the browser's console."""

import base64
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import requests

from broker_process import BIN
from debian_packages import require_files

CHROMIUM = {"/usr/bin/chromium": "chromium", "/usr/bin/chromedriver": "chromium-driver"}
SCREENSHOTS = Path(__file__).resolve().parent.parent / "build" / "screenshots"
WAIT = 10


@pytest.fixture(scope="module")
def chromium():
    if not all(Path(path).exists() for path in CHROMIUM) and os.geteuid() != 0:
        pytest.skip("Debian's chromium and chromium-driver are not installed, and installing them needs root")
    require_files(CHROMIUM, "the dashboard tests")


@pytest.fixture
def browser(chromium, request):
    """A headless Chromium. A test with a broker of its own asks for it before this, so
    the broker outlives the page's last requests."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENSHOTS / f"{request.node.name}.png"))
    errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE" and not expected(entry)]
    expected.failures = ()
    driver.quit()
    assert errors == [], f"console errors: {errors}"


def expected(entry):
    """Refusals and outages a test provokes on purpose show in the console as failed loads
    (a test sets expected.failures to what they say)."""
    return entry["source"] == "network" and any(text in entry["message"] for text in expected.failures)


expected.failures = ()


def wait_for(driver, condition, what, timeout=WAIT):
    """condition(driver)'s value once it is true. The page redraws its panels as it reloads
    them: an element found a moment before may be gone, and the condition is asked again."""
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    waiting = WebDriverWait(driver, timeout, poll_frequency=0.05, ignored_exceptions=[StaleElementReferenceException])
    try:
        return waiting.until(lambda d: condition(d))
    except TimeoutException:
        raise AssertionError(f"{what} did not happen within {timeout} s") from None


def by_css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def texts(driver, selector):
    return [node.text for node in by_css(driver, selector)]


def post(url, channel, message, sender="api-agent", headers=None, **extra):
    reply = requests.post(
        f"{url}/messages/{channel}", json={"sender": sender, "message": message, **extra}, headers=headers, timeout=10
    )
    assert reply.status_code == 201, reply.text
    return reply.json()


def test_a_posted_message_appears_in_the_live_tail_within_a_second(browser, url, channel):
    post(url, channel, "already there")
    browser.get(f"{url}/ui/#/c/{channel}")
    wait_for(browser, lambda d: "already there" in texts(d, "#messages .text"), "the channel's page")
    wait_for(browser, lambda d: by_css(d, "#tail-panel.live"), "the live tail")
    posted = time.monotonic()
    post(url, channel, "fresh from the API", priority=5, tags=["ci"])
    wait_for(browser, lambda d: "fresh from the API" in texts(d, "#messages .text"), "the new message", timeout=1)
    assert time.monotonic() - posted < 1.0
    node = by_css(browser, "#messages li.message")[-1]
    assert "priority 5" in node.text and "ci" in node.text


def test_replies_fold_under_their_first_message(browser, url, channel):
    first = post(url, channel, "the question")
    post(url, channel, "an answer", reply_to=first["id"])
    browser.get(f"{url}/ui/#/c/{channel}")
    wait_for(browser, lambda d: "an answer" in texts(d, ".replies .text"), "the folded reply")
    assert texts(browser, "#messages > li.message > .text") == ["the question"]


def test_the_composer_posts_and_replies(browser, url, channel):
    first = post(url, channel, "please reply")
    browser.get(f"{url}/ui/#/c/{channel}")
    wait_for(browser, lambda d: "please reply" in texts(d, "#messages .text"), "the channel's page")
    sender = by_css(browser, "#sender")[0]
    sender.clear()
    sender.send_keys("person-at-desk")
    by_css(browser, "#text")[0].send_keys("typed in the browser")
    by_css(browser, "#send")[0].click()
    wait_for(browser, lambda d: "typed in the browser" in texts(d, "#messages .text"), "the composed message")
    by_css(browser, "#messages li.message .reply")[0].click()
    by_css(browser, "#text")[0].send_keys("and a reply")
    by_css(browser, "#send")[0].click()
    wait_for(browser, lambda d: "and a reply" in texts(d, ".replies .text"), "the reply, folded")
    messages = requests.get(f"{url}/messages/{channel}", timeout=10).json()["messages"]
    mine = {m["message"]: m for m in messages if m["sender"] == "person-at-desk"}
    assert set(mine) == {"typed in the browser", "and a reply"}
    assert mine["and a reply"]["reply_to"] == first["id"]


def test_a_task_moves_from_pending_to_claimed_to_done(browser, url, channel):
    task = post(url, channel, "a job")
    worker = {"X-Agent-ID": "worker-7"}
    taken = requests.post(f"{url}/queue/{channel}/take", json={"lease": 300}, headers=worker, timeout=10).json()
    requests.post(f"{url}/messages/{channel}/{taken['id']}/release", json={}, headers=worker, timeout=10)
    browser.get(f"{url}/ui/")

    def count(state):
        nodes = by_css(browser, f'.queue[data-channel="{channel}"] [data-state="{state}"]')
        return int(nodes[0].get_attribute("data-count")) if nodes else None

    wait_for(browser, lambda d: count("pending") == 1, "the task pending")
    requests.post(f"{url}/queue/{channel}/take", json={"lease": 300}, headers=worker, timeout=10)
    wait_for(browser, lambda d: count("claimed") == 1 and count("pending") == 0, "the task claimed")
    held = texts(browser, f'.queue[data-channel="{channel}"] .claimed li')
    assert len(held) == 1 and "worker-7" in held[0] and "s left" in held[0]
    requests.post(f"{url}/messages/{channel}/{task['id']}/done", json={"message": "did it"}, headers=worker, timeout=10)
    wait_for(browser, lambda d: count("done") == 1 and count("claimed") == 0, "the task done")


def test_agents_show_presence(browser, url, channel):
    post(url, channel, "hello", sender="present-agent")
    browser.get(f"{url}/ui/")
    wait_for(browser, lambda d: any("present-agent" in t for t in texts(d, "#agents li.online")), "the agent online")


def test_channels_show_counts_and_a_sparkline(browser, url, channel):
    for n in range(3):
        post(url, channel, f"m{n}")
    browser.get(f"{url}/ui/")
    wait_for(browser, lambda d: by_css(d, f'#channels a[data-channel="{channel}"]'), "the channel listed")
    item = by_css(browser, f'#channels a[data-channel="{channel}"]')[0].find_element("xpath", "..")
    assert item.find_element("css selector", ".count").text == "3"
    points = item.find_element("css selector", ".spark polyline").get_attribute("points").split()
    assert len(points) == 60 and points[-1].endswith(",1.0")  # this minute's 3 messages: the top


def test_search_finds_a_message(browser, url, channel):
    post(url, channel, "the needle in the haystack")
    browser.get(f"{url}/ui/")
    box = wait_for(browser, lambda d: by_css(d, "#search"), "the search box")[0]
    box.send_keys("needle haystack\n")
    wait_for(browser, lambda d: any("the needle" in t for t in texts(d, "#found li")), "the search result")
    assert any(channel in t for t in texts(browser, "#found li a"))


def test_signatures_are_checked_in_the_browser(browser, broker, channel):
    """Each message's mark, checked with the browser's WebCrypto against the keys the broker
    lists: a signed message verified, one whose text was changed in the database BAD, an
    unsigned one unmarked; a sealed one shows for whom, not its ciphertext."""
    import rfc8785
    from nacl.signing import SigningKey

    def b64(raw):
        return base64.b64encode(bytes(raw)).decode()

    def signature(text, priority=3, tags=(), meta=None):
        ts = int(time.time() * 1000)
        document = {
            "type": "agent-comms/message", "v": 1, "channel": channel, "sender": sender, "message": text,
            "reply_to": None, "priority": priority, "tags": list(tags), "meta": meta or {}, "ts": ts,
        }  # fmt: skip
        signed = key.sign(rfc8785.dumps(document)).signature
        return {"v": 1, "alg": "ed25519", "key": b64(key.verify_key), "ts": ts, "sig": b64(signed)}

    sender, key = f"signer-{channel}", SigningKey.generate()
    published = requests.put(f"{broker.url}/agents/{sender}/keys", json={"sign": b64(key.verify_key)}, timeout=10)
    assert published.status_code == 201, published.text
    # RFC 8785 beyond the plain case: non-ASCII text, keys "10" before "9", nested meta.
    text, tags, meta = "déjà vu ✓ 🎉", ["ops", "ci"], {"b": [1.5, None], "a": {"9": True, "10": "x"}}
    good = post(broker.url, channel, text, sender, priority=4, tags=tags, meta=meta,
                signature=signature(text, 4, tags, meta))  # fmt: skip
    altered = post(broker.url, channel, "pay 10 EUR", sender, signature=signature("pay 10 EUR"))
    unsigned = post(broker.url, channel, "not signed", sender)
    box = {"v": 1, "alg": "x25519-sealedbox", "to": "someone", "key": b64(bytes(32))}
    sealed = post(broker.url, channel, "Y2lwaGVydGV4dA==", sender, meta={"sealed": box})
    with sqlite3.connect(broker.db_path) as db:
        db.execute("UPDATE messages SET message = ? WHERE id = ?", ("pay 1000 EUR", altered["id"]))
    browser.get(f"{broker.url}/ui/#/c/{channel}")

    def mark(message):
        return by_css(browser, f'li.message[data-id="{message["id"]}"] > .head > .sig')[0]

    wait_for(browser, lambda d: len(by_css(d, "#messages li.message")) == 4, "the channel's page")
    wait_for(
        browser,
        lambda d: [mark(m).get_attribute("data-sig") for m in (good, altered)] == ["verified", "bad"],
        "the signed messages' marks",
    )
    assert mark(good).text == "✓ verified" and "current key" in mark(good).get_attribute("title")
    assert mark(altered).text == "✗ BAD" and "does not check" in mark(altered).get_attribute("title")
    assert mark(unsigned).get_attribute("data-sig") == "unsigned" and not mark(unsigned).is_displayed()
    assert mark(sealed).get_attribute("data-sig") == "unsigned"
    assert texts(browser, "#messages .text") == [text, "pay 1000 EUR", "not signed", "sealed for someone"]
    assert "Y2lwaGVy" not in browser.page_source


def test_a_token_is_asked_for_and_grants_hold(own_broker, browser):
    expected.failures = ("status of 403",)  # the channel outside the grant
    broker = own_broker(env={"AGENT_COMMS_AUTH": "required"}).start()
    made = subprocess.run(
        [str(BIN / "agent-comms-broker"), "token", "add", "person", "--read", "team-*", "--write", "team-*",
         "--db", broker.db_path],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    secret = made.stdout.strip()
    admin = subprocess.run(
        [str(BIN / "agent-comms-broker"), "token", "add", "admin", "--db", broker.db_path],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    as_admin = {"Authorization": f"Bearer {admin}"}
    post(broker.url, "team-a", "for the team", sender="admin", headers=as_admin)
    post(broker.url, "secret", "not for the team", sender="admin", headers=as_admin)
    browser.get(f"{broker.url}/ui/")
    wait_for(browser, lambda d: by_css(d, "#login-dialog[open]"), "the token dialog")
    by_css(browser, "#token")[0].send_keys(secret)
    by_css(browser, "#login-save")[0].click()
    wait_for(browser, lambda d: "as person" in texts(d, "#who"), "the page acting as the token's agent")
    assert browser.execute_script("return sessionStorage.getItem('agent-comms-token')") == secret
    assert browser.execute_script("return localStorage.length") == 0  # the tab's session only
    wait_for(browser, lambda d: texts(d, "#channels a") == ["team-a"], "only the granted channel listed")
    browser.get(f"{broker.url}/ui/#/c/secret")
    wait_for(browser, lambda d: "403" in " ".join(texts(d, "#error")), "the refusal shown")
    assert "may not read channel 'secret'" in texts(browser, "#error")[0]
    assert "not for the team" not in browser.page_source
    browser.get(f"{broker.url}/ui/#/c/team-a")
    wait_for(browser, lambda d: "for the team" in texts(d, "#messages .text"), "the granted channel")
    by_css(browser, "#text")[0].send_keys("posted with the token")
    by_css(browser, "#send")[0].click()
    wait_for(browser, lambda d: "posted with the token" in texts(d, "#messages .text"), "the post")
    page = requests.get(f"{broker.url}/messages/team-a", headers={"Authorization": f"Bearer {admin}"}, timeout=10)
    assert page.json()["messages"][-1]["sender"] == "person"


def test_the_page_is_served_with_its_own_policy_and_the_api_keeps_its_own(url):
    page = requests.get(f"{url}/ui/", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "'unsafe-inline'" not in policy and "default-src 'none'" in policy
    assert requests.get(f"{url}/status", timeout=10).headers["Content-Security-Policy"] == (
        "default-src 'none'; frame-ancestors 'none'"
    )
    missing = requests.get(f"{url}/ui/nosuch.js", timeout=10)
    assert missing.status_code == 404 and missing.json() == {"error": "no such file of the dashboard"}
    assert requests.get(f"{url}/ui/..%2fopenapi.json", timeout=10).status_code == 404
    assert requests.get(f"{url}/ui", timeout=10, allow_redirects=False).headers["Location"].endswith("/ui/")


def test_the_dashboard_can_be_turned_off(own_broker):
    broker = own_broker(env={"AGENT_COMMS_UI": "off"}, workers=1).start()
    assert requests.get(f"{broker.url}/ui/", timeout=10).status_code == 404
    assert requests.get(f"{broker.url}/status", timeout=10).status_code == 200


def test_a_phone_sized_screen_gets_one_column(browser, url, channel):
    post(url, channel, "on a phone")
    browser.set_window_size(390, 844)
    browser.get(f"{url}/ui/#/c/{channel}")
    wait_for(browser, lambda d: "on a phone" in texts(d, "#messages .text"), "the channel's page")
    columns = browser.execute_script("return getComputedStyle(document.querySelector('main')).gridTemplateColumns")
    assert len(columns.split()) == 1
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 390


def test_the_live_tail_resumes_after_a_broker_restart(own_broker, browser):
    expected.failures = ("ERR_CONNECTION_REFUSED",)  # while the broker is down
    broker = own_broker().start()
    post(broker.url, "ops", "before the restart")
    browser.get(f"{broker.url}/ui/#/c/ops")
    wait_for(browser, lambda d: by_css(d, "#tail-panel.live"), "the live tail")
    broker.stop()
    wait_for(browser, lambda d: not by_css(d, "#tail-panel.live"), "the tail noticing the broker gone")
    broker.start()
    # Posted before the page has reconnected: only resuming from its last id brings it.
    post(broker.url, "ops", "while the page was away")
    post(broker.url, "ops", "after it came back")
    wait_for(
        browser,
        lambda d: (
            texts(d, "#messages .text") == ["before the restart", "while the page was away", "after it came back"]
        ),
        "both messages after the restart, once each",
    )


def test_the_main_view_with_every_panel(own_broker, browser):
    """A scene with something in every panel; its screenshot is the README's."""
    broker = own_broker().start()
    url = broker.url
    alert = post(url, "alerts", "Disk 91% full on CT-950", sender="monitor", priority=5, tags=["disk", "page"])
    post(url, "alerts", "Cleaning old backups now", sender="warp-ct200", reply_to=alert["id"])
    for n in range(3):
        post(url, "tasks", f"Transcode episode {n + 1}", sender="claude-ct210", tags=["media"])
    worker = {"X-Agent-ID": "warp-ct201"}
    taken = requests.post(f"{url}/queue/tasks/take", json={"lease": 600}, headers=worker, timeout=10).json()
    requests.post(
        f"{url}/messages/tasks/{taken['id']}/done", json={"message": "done: ep1.mkv"}, headers=worker, timeout=10
    )
    requests.post(f"{url}/queue/tasks/take", json={"lease": 600}, headers=worker, timeout=10)
    post(url, "general", "Good morning, agents", sender="warp-ct200")
    browser.get(f"{url}/ui/#/c/alerts")
    wait_for(browser, lambda d: "Cleaning old backups now" in texts(d, ".replies .text"), "the thread")
    wait_for(browser, lambda d: len(texts(d, "#channels a")) == 3, "three channels")
    wait_for(browser, lambda d: len(texts(d, "#agents li")) >= 4, "the agents")
    wait_for(browser, lambda d: texts(d, ".queue .claimed li"), "the claimed task")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOTS / "dashboard.png"))
