"""The chat page (GET /) in a real browser: headless Chromium driven by
Selenium, against the real im-server binary on a free port (embedded store).

Run by .ci/test from its virtualenv:  python -m unittest discover -s tests/browser -v
Environment: IM_SERVER_BIN (default target/debug/im-server), CHROMIUM
(/usr/bin/chromium), CHROMEDRIVER (/usr/bin/chromedriver), SCREENSHOT_DIR
(target/browser). Every wait is a WebDriverWait on the DOM, never a sleep.
"""

import http.client
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SERVER_BIN = os.environ.get("IM_SERVER_BIN", os.path.join(ROOT, "target", "debug", "im-server"))
SCREENSHOT_DIR = os.environ.get("SCREENSHOT_DIR", os.path.join(ROOT, "target", "browser"))


def drain(pipe):
    with pipe:
        pipe.read()


def start_server(*role, env=None):
    role = role or ("all", "--rpc-listen", "127.0.0.1:0")
    proc = subprocess.Popen(
        [SERVER_BIN, *role, "--http-addr", "127.0.0.1:0"], env=env,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        match = re.search(r"http listening on (\S+)", line)
        if match:
            # Keep reading its log, so that the server never blocks on a full pipe.
            threading.Thread(target=drain, args=(proc.stderr,), daemon=True).start()
            return proc, "http://" + match.group(1)
    proc.kill()
    raise RuntimeError("im-server did not start")


def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=900,700"):
        options.add_argument(arg)
    # The driver path is given, so Selenium Manager never tries to download one.
    service = Service(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
    return webdriver.Chrome(service=service, options=options)


class ChatPage(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server, cls.base = start_server()
        cls.alice = browser()
        cls.bob = browser()
        os.makedirs(SCREENSHOT_DIR, exist_ok=True)

    @classmethod
    def tearDownClass(cls):
        for driver in (cls.alice, cls.bob):
            driver.quit()
        cls.server.kill()
        cls.server.wait()

    def api(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def status_only(self, path):
        """The status of a GET, without reading a body (a stream's never ends)."""
        host = urllib.parse.urlsplit(self.base).netloc
        conn = http.client.HTTPConnection(host, timeout=5)
        try:
            conn.request("GET", path)
            return conn.getresponse().status
        finally:
            conn.close()

    def send(self, chat, sender, text):
        status, body = self.api("POST", "/api/send", {"chat": chat, "text": text, "sender": sender})
        self.assertEqual(status, 200, body)
        return json.loads(body)["send_time"]

    def open_room(self, driver, room, name):
        fragment = urllib.parse.urlencode({"room": room, "name": name})
        driver.get(self.base + "/#" + fragment)
        WebDriverWait(driver, 10).until(
            lambda d: name in d.find_element(By.ID, "room-title").text)

    def messages(self, driver):
        """(send_time, sender, text) of every message on the page, top to bottom."""
        return driver.execute_script(
            "return Array.from(document.querySelectorAll('li.msg'), li => "
            "[Number(li.dataset.sendTime), li.querySelector('.sender').textContent,"
            " li.querySelector('.text').textContent]);")

    def type_and_send(self, driver, text):
        box = driver.find_element(By.ID, "text")
        WebDriverWait(driver, 5).until(lambda d: box.is_enabled())
        box.send_keys(text)
        box.send_keys(Keys.ENTER)

    def error_text(self, driver, timeout=5):
        return WebDriverWait(driver, timeout).until(
            lambda d: d.find_element(By.ID, "error").text or False)

    def test_a_message_typed_in_one_session_shows_in_the_other_within_a_second(self):
        if self.status_only("/api/stream?chat=probe") == 404:
            self.skipTest("GET /api/stream is not in this build: live updates cannot be tested")
        room = "alice:bob"
        self.send(room, "bob", "hi alice, this room is just the two of us")
        self.open_room(self.alice, room, "alice")
        self.open_room(self.bob, room, "bob")
        self.assertEqual(self.alice.find_element(By.ID, "room-title").text.split("as ")[0].strip(),
                         "Direct: alice \u2194 bob")
        for sender, receiver, text in ((self.alice, self.bob, "hello bob \u00fc\u2192 <b>not bold</b>"),
                                       (self.bob, self.alice, "hi! & welcome")):
            self.type_and_send(sender, text)
            started = time.monotonic()
            WebDriverWait(receiver, float(os.environ.get("LIVE_TIMEOUT", "1.0")), poll_frequency=0.02).until(
                lambda d: any(m[2] == text for m in self.messages(d)))
            print(f"  live: shown in the other session after {time.monotonic() - started:.3f} s")
        # Live updates and sends went over the WebSocket (/api/ws).
        for driver in (self.alice, self.bob):
            self.assertEqual(driver.execute_script("return window.imTransport"), "websocket")
        # Text is text: the markup arrived as characters, not as an element.
        self.assertEqual(self.bob.find_elements(By.CSS_SELECTOR, "li.msg .text b"), [])
        for driver in (self.alice, self.bob):
            self.assertEqual([m[2] for m in self.messages(driver)][-2:],
                             ["hello bob \u00fc\u2192 <b>not bold</b>", "hi! & welcome"])
        WebDriverWait(self.alice, 5).until(
            lambda d: d.find_element(By.ID, "send").is_enabled()
            and d.find_element(By.ID, "text").get_property("value") == "")
        self.alice.save_screenshot(os.path.join(SCREENSHOT_DIR, "chat.png"))

    def test_without_a_websocket_the_page_falls_back_to_sse_and_http(self):
        if self.status_only("/api/stream?chat=probe") == 404:
            self.skipTest("GET /api/stream is not in this build: live updates cannot be tested")
        # A browser whose WebSocket cannot connect (its URL answers 404, as
        # behind a proxy that refuses the upgrade): the page follows by SSE.
        driver = browser()
        try:
            driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": (
                "const Real = window.WebSocket;"
                "window.WebSocket = class extends Real {"
                " constructor(url) { super(url.replace('/api/ws', '/api/no-ws')); } };")})
            self.open_room(driver, "fallback-room", "ivan")
            WebDriverWait(driver, 5).until(lambda d: d.execute_script("return window.imTransport") == "sse")
            self.type_and_send(driver, "sent over HTTP")
            WebDriverWait(driver, 5).until(
                lambda d: [m[2] for m in self.messages(d)] == ["sent over HTTP"])
            self.send("fallback-room", "judy", "arrived by SSE")
            WebDriverWait(driver, 5, poll_frequency=0.05).until(
                lambda d: [m[2] for m in self.messages(d)] == ["sent over HTTP", "arrived by SSE"])
        finally:
            driver.quit()

    def test_edit_and_delete_your_own_message_shows_in_both_sessions(self):
        if self.status_only("/api/stream?chat=probe") == 404:
            self.skipTest("GET /api/stream is not in this build: live updates cannot be tested")
        room = "edit-room"
        self.open_room(self.alice, room, "alice")
        self.open_room(self.bob, room, "bob")
        self.type_and_send(self.alice, "a typo hre")
        for driver in (self.alice, self.bob):
            WebDriverWait(driver, 5).until(
                lambda d: [m[2] for m in self.messages(d)] == ["a typo hre"])
        # Only one's own message offers Edit and Delete.
        self.assertEqual(len(self.alice.find_elements(By.CSS_SELECTOR, "li.msg button.edit")), 1)
        self.assertEqual(self.bob.find_elements(By.CSS_SELECTOR, "li.msg button.edit"), [])
        self.alice.find_element(By.CSS_SELECTOR, "li.msg button.edit").click()
        box = WebDriverWait(self.alice, 5).until(
            lambda d: d.find_element(By.CSS_SELECTOR, "li.msg textarea.edit-box"))
        box.clear()
        box.send_keys("a typo here, fixed")
        self.alice.find_element(By.CSS_SELECTOR, "li.msg button.save").click()
        for driver in (self.alice, self.bob):
            WebDriverWait(driver, 5).until(
                lambda d: [m[2] for m in self.messages(d)] == ["a typo here, fixed"]
                and d.find_elements(By.CSS_SELECTOR, "li.msg .edited"))
        self.alice.save_screenshot(os.path.join(SCREENSHOT_DIR, "chat-edited.png"))
        status, body = self.api("GET", "/api/pull?chat=" + room)
        self.assertEqual(json.loads(body)["messages"][0]["text"], "a typo here, fixed")
        self.alice.find_element(By.CSS_SELECTOR, "li.msg button.delete").click()
        for driver in (self.alice, self.bob):
            WebDriverWait(driver, 5).until(lambda d: self.messages(d) == [])
        status, body = self.api("GET", "/api/pull?chat=" + room)
        self.assertEqual(json.loads(body)["messages"], [])
        # Bob learnt of both over his WebSocket subscription (/api/ws).
        self.assertEqual(self.bob.execute_script("return window.imTransport"), "websocket")

    def test_after_a_dropped_websocket_the_page_resumes_with_the_changes_it_missed(self):
        if self.status_only("/api/stream?chat=probe") == 404:
            self.skipTest("GET /api/stream is not in this build: live updates cannot be tested")
        room = "resume-room"
        t1 = self.send(room, "erin", "first")
        t2 = self.send(room, "erin", "second")
        # A browser whose WebSockets the test can see and close (as a
        # network drop would), and whose frames it can read.
        driver = browser()
        try:
            driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": (
                "window.testSockets = []; window.testSent = [];"
                "const Real = window.WebSocket;"
                "window.WebSocket = class extends Real {"
                " constructor(url) { super(url); window.testSockets.push(this); }"
                " send(data) { window.testSent.push(String(data)); super.send(data); } };")})
            self.open_room(driver, room, "frank")
            WebDriverWait(driver, 5).until(
                lambda d: d.execute_script("return window.imTransport") == "websocket")
            # A live event, so the page holds an event id (both cursors).
            t3 = self.send(room, "erin", "third")
            WebDriverWait(driver, 5).until(
                lambda d: [m[2] for m in self.messages(d)] == ["first", "second", "third"])
            driver.execute_script("window.testSockets[window.testSockets.length - 1].close();")
            # Away (the page reconnects after 1 s): an edit and a delete.
            status, body = self.api("POST", "/api/edit", {"chat": room, "send_time": t1, "text": "first, edited"})
            self.assertEqual(status, 200, body)
            status, body = self.api("POST", "/api/delete", {"chat": room, "send_time": t2})
            self.assertEqual(status, 200, body)
            WebDriverWait(driver, 10).until(
                lambda d: [m[2] for m in self.messages(d)] == ["first, edited", "third"]
                and d.find_elements(By.CSS_SELECTOR, "li.msg .edited"))
            self.assertEqual(driver.execute_script("return window.testSockets.length"), 2)
            sent = [json.loads(f) for f in driver.execute_script("return window.testSent")]
            subscribes = [f for f in sent if f.get("op") == "subscribe"]
            self.assertEqual(len(subscribes), 2, sent)
            self.assertNotIn("changes_after", subscribes[0], "a first subscription starts afresh")
            self.assertEqual(subscribes[1]["cursor"], t3, "resumed after the newest message")
            self.assertGreater(subscribes[1]["changes_after"], 0, "and after the last change seen")
        finally:
            driver.quit()

    def test_scrolling_back_loads_every_older_message_exactly_once(self):
        room = "history-room"
        seeded = [self.send(room, "seed", f"message {i:02}") for i in range(45)]
        self.open_room(self.alice, room, "carol")
        WebDriverWait(self.alice, 5).until(lambda d: len(self.messages(d)) >= 20)
        self.assertLess(len(self.messages(self.alice)), 45, "the first page should not hold everything")

        def scrolled_back(driver):
            driver.execute_script("document.getElementById('messages').scrollTop = 0;")
            return len(self.messages(driver)) >= 45 and "beginning" in driver.find_element(
                By.ID, "messages").text
        WebDriverWait(self.alice, 10, poll_frequency=0.1).until(scrolled_back)
        shown = self.messages(self.alice)
        times = [m[0] for m in shown]
        self.assertEqual(len(times), len(set(times)), "a message is shown twice")
        self.assertEqual(times, seeded, "every message once, oldest at the top")
        self.assertEqual([m[2] for m in shown], [f"message {i:02}" for i in range(45)])

    def test_a_400_shows_the_servers_message(self):
        self.open_room(self.alice, "r" * 300, "dave")
        self.assertIn("400: `chat` must be at most 256 bytes", self.error_text(self.alice))
        self.open_room(self.alice, "errors-room", "dave")
        box = self.alice.find_element(By.ID, "text")
        WebDriverWait(self.alice, 5).until(lambda d: box.is_enabled())
        self.alice.execute_script("arguments[0].value = 'x'.repeat(65537);", box)
        box.send_keys(Keys.ENTER)
        self.assertIn("400: `text` must be at most 65536 bytes", self.error_text(self.alice))
        self.assertEqual(self.messages(self.alice), [])

    def test_a_503_shows_the_servers_message(self):
        # A gateway whose RPC server is not there: every pull is a 503.
        gateway, base = start_server("gateway", "--rpc", "127.0.0.1:1")
        try:
            self.alice.get(base + "/#" + urllib.parse.urlencode({"room": "down", "name": "erin"}))
            self.assertIn("503: the message service is unavailable", self.error_text(self.alice))
        finally:
            gateway.kill()
            gateway.wait()

    def test_with_authentication_the_token_field_is_used(self):
        secret_dir = tempfile.mkdtemp()
        secret = os.path.join(secret_dir, "secret")
        with open(secret, "w") as f:
            f.write("s" * 40)
        env = dict(os.environ, IM_AUTH_JWT_SECRET_FILE=secret)
        server, base = start_server("all", "--rpc-listen", "127.0.0.1:0", env=env)

        def token(user):
            return subprocess.run([SERVER_BIN, "token", "--sub", user], env=env, check=True,
                                  capture_output=True, text=True).stdout.strip()
        try:
            driver = self.alice
            driver.get(base + "/")

            def join(room, name, bearer):
                # As a person would: an empty token field first (the name is
                # editable again), then room, name and token typed in turn.
                driver.execute_script(
                    "const t = document.getElementById('token');"
                    " t.value = ''; t.dispatchEvent(new Event('input'));")
                for field, value in (("room", room), ("name", name), ("token", bearer)):
                    box = driver.find_element(By.ID, field)
                    box.clear()
                    box.send_keys(value)
                driver.find_element(By.ID, "join-button").click()
            join("frank:grace", "frank", "not-a-token")
            self.assertIn("401: ", self.error_text(driver))
            join("frank:grace", "frank", token("frank"))
            self.type_and_send(driver, "signed hello")
            WebDriverWait(driver, 5).until(
                lambda d: [m[1:] for m in self.messages(d)] == [["frank", "signed hello"]])
            # Grace's answer arrives on the WebSocket, authenticated by its first frame.
            req = urllib.request.Request(
                base + "/api/send", method="POST",
                data=json.dumps({"chat": "grace:frank", "text": "hi frank"}).encode(),
                headers={"Content-Type": "application/json", "Authorization": "Bearer " + token("grace")})
            with urllib.request.urlopen(req, timeout=5) as resp:
                self.assertEqual(resp.status, 200)
            WebDriverWait(driver, 5, poll_frequency=0.05).until(
                lambda d: [m[2] for m in self.messages(d)] == ["signed hello", "hi frank"])
            self.assertEqual(driver.execute_script("return window.imTransport"), "websocket")
            # The name is the token's user: "bob" typed with frank's token
            # joins as frank (it used to join as bob, then every send was 403).
            join("frank:grace", "bob", token("frank"))
            WebDriverWait(driver, 5).until(
                lambda d: d.find_element(By.ID, "room-title").text.endswith("as frank"))
            name_box = driver.find_element(By.ID, "name")
            self.assertEqual(name_box.get_property("value"), "frank")
            self.assertTrue(name_box.get_property("readOnly"))
            self.type_and_send(driver, "sent as the token's user")
            WebDriverWait(driver, 5).until(
                lambda d: [m[1:] for m in self.messages(d)][-1:] == [["frank", "sent as the token's user"]])
            self.assertEqual(driver.find_element(By.ID, "error").text, "")
            join("grace:heidi", "frank", token("frank"))
            self.assertIn("403: ", self.error_text(driver))
        finally:
            server.kill()
            server.wait()
            shutil.rmtree(secret_dir)


if __name__ == "__main__":
    unittest.main(verbosity=2)
