"""The browser page (clients/web/) in headless Chromium against a real `musicrfm serve`, over a real socket.

Needs Playwright's Python package and /usr/bin/chromium; without them the test is skipped, except in CI
(the CI variable set), where it fails: CI installs both.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--autoplay-policy=no-user-gesture-required"]
SCREENSHOT = "/tmp/musicrfm-browser.png"


def _missing(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI installs it)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        _missing(f"playwright is not installed: {exc}")
    if not os.path.exists(CHROMIUM):
        _missing(f"no Chromium at {CHROMIUM}")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


class Page:
    """One page of the web client, with everything it requested and sent recorded."""

    def __init__(self, browser, url: str):
        self.context = browser.new_context(viewport={"width": 1200, "height": 900})
        self.page = self.context.new_page()
        self.requests: list[str] = []
        self.sockets: list[str] = []
        self.sent: list[tuple[float, dict]] = []  # (time, control message) for each text frame sent
        self.js_errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("websocket", self._on_socket)
        self.page.on("pageerror", lambda e: self.js_errors.append(str(e)))
        self.page.on("console", lambda m: m.type == "error" and self.js_errors.append(m.text))
        self.page.goto(url)

    def _on_socket(self, ws):
        self.sockets.append(ws.url)

        def sent(payload):
            if isinstance(payload, str):
                self.sent.append((time.monotonic(), json.loads(payload)))

        ws.on("framesent", sent)

    def js(self, expression: str, arg=None):
        return self.page.evaluate(expression, arg)

    def wait(self, predicate: str, arg=None, timeout_s: float = 10):
        self.page.wait_for_function(predicate, arg=arg, timeout=timeout_s * 1000)

    def wire_sets(self, first: int, count: int, timeout_s: float = 5) -> list[dict]:
        """The `set` messages seen on the wire from index `first` on, once `count` of them have arrived."""
        deadline = time.monotonic() + timeout_s
        while True:
            sets = [m for _, m in self.sent[first:] if m.get("type") == "set"]
            if len(sets) >= count or time.monotonic() > deadline:
                return sets
            self.page.wait_for_timeout(20)  # lets Playwright deliver the pending framesent events

    def knob(self, key: str):
        return self.page.locator(f'.dir[data-key="{key}"] input.knob')

    def close(self):
        self.context.close()


def _coefficient_is(key: str) -> str:
    return ("(t) => { const s = window.musicrfm.state; const d = s && s.directions['%s'];"
            " return !!d && Math.abs(d.coefficient - t) < 1e-9; }" % key)


def test_page_plays_and_steers_a_shared_session(browser, live_server):
    from playwright.sync_api import expect

    session = f"web-{uuid.uuid4().hex[:8]}"
    origin = live_server.http_url.rstrip("/")
    assert origin.startswith("http://")
    ws_origin = "ws://" + origin[len("http://"):]
    url = f"{origin}/?session={session}"

    a = Page(browser, url)
    b = None
    try:
        # Loads and connects: the hello lists the bank's directions, one knob each; the model is named
        # and random weights are announced as noise.
        a.wait("window.musicrfm && window.musicrfm.connected && window.musicrfm.hello !== null")
        hello = a.js("window.musicrfm.hello")
        assert hello["session"] == session
        keys = hello["directions"]
        assert {"notes:C", "notes:G"} <= set(keys)
        cmax = hello["limits"]["coefficient_max"]
        expect(a.page.locator(".dir input.knob")).to_have_count(len(keys))
        for key in ("notes:C", "notes:G"):
            assert a.knob(key).evaluate("(e) => [Number(e.min), Number(e.max), Number(e.value)]") == [-cmax, cmax, 0]
        expect(a.page.locator("#model")).to_contain_text(hello["model"])
        if hello["random_weights"]:
            expect(a.page.locator("#noise-note")).to_be_visible()
            expect(a.page.locator("#noise-note")).to_contain_text("noise, not music")
        assert a.js("window.musicrfm.state.playback") == "stopped"

        # Play (a real click): audio frames arrive and the worklet plays them.
        a.page.click("#play")
        a.wait("window.musicrfm.state.playback === 'playing'")
        a.wait("window.musicrfm.audioFrames >= 2 && window.musicrfm.samplesPlayed > 0", timeout_s=20)
        assert a.js("window.musicrfm.audio") == "worklet"
        header = a.js("window.musicrfm.lastHeader")
        assert header["sampleRate"] == hello["sample_rate"]
        assert header["headerVersion"] == 1 and header["headerBytes"] == 40
        assert header["epoch"] == a.js("window.musicrfm.epoch")
        tenth = hello["sample_rate"] // 10
        played = a.js("window.musicrfm.samplesPlayed")
        a.wait("([n, d]) => window.musicrfm.samplesPlayed > n + d", arg=[played, tenth], timeout_s=10)  # 0.1 s more
        a.wait("window.musicrfm.level.peak > 0", timeout_s=5)  # the meter hears what is played
        # This page was there from sample 0: it got every chunk of the stream, contiguous.
        end, received, played = a.js("[window.musicrfm.lastHeader.firstSample + window.musicrfm.lastHeader.numSamples,"
                                     " window.musicrfm.samplesReceived, window.musicrfm.samplesPlayed]")
        assert end == received and 0 < played <= received

        # Move a knob with the keyboard (real input events): the set goes out, the server echoes a
        # state with a higher version and the new coefficient, and the knob shows it.
        version = a.js("window.musicrfm.version")
        knob = a.knob("notes:C")
        knob.focus()
        knob.press("End")
        for _ in range(5):
            knob.press("ArrowLeft")
        target = round(cmax - 0.05, 2)
        a.wait(_coefficient_is("notes:C"), arg=target)
        assert a.js("window.musicrfm.version") > version
        assert a.js("window.musicrfm.lastState.version") > version
        assert abs(float(knob.input_value()) - target) < 1e-9
        expect(a.page.locator('.dir[data-key="notes:C"] .value')).to_have_text(f"{target:.2f}")
        state = a.js("window.musicrfm.state")
        assert state["directions"]["notes:C"]["active"] is True
        expect(a.page.locator('.dir[data-key="notes:C"] input.active')).to_be_checked()
        last = a.js("window.musicrfm.sentLog.at(-1).msg")
        assert last["type"] == "set" and last["directions"] == {"notes:C": {"coefficient": target}}
        assert last["id"] == a.js("window.musicrfm.lastState.cause.id")  # the echo names the set

        # Throttling: 40 key presses in quick succession send at most ~30 messages a second, the last
        # one with the final value.
        knob.press("Home")
        a.wait(_coefficient_is("notes:C"), arg=-cmax)
        first_wire, first_log = len(a.sent), a.js("window.musicrfm.sent")
        for _ in range(40):
            knob.press("ArrowRight")
        target = round(-cmax + 0.4, 2)
        a.wait(_coefficient_is("notes:C"), arg=target)
        log = a.js("(n) => window.musicrfm.sentLog.filter((e) => e.n > n)", first_log)
        wire = a.wire_sets(first_wire, len(log))
        assert [e["msg"] for e in log] == wire  # the page's own log of what it sent is what went out
        assert wire[-1]["directions"]["notes:C"]["coefficient"] == target
        # When the page decided to send each one (its throttle's clock: the wire adds the machine's jitter).
        times = [e["t"] / 1000 for e in log]
        gaps = [t1 - t0 for t0, t1 in zip(times, times[1:])]
        assert len(wire) < 40 and all(g >= 1 / 30 - 0.002 for g in gaps), gaps  # <= 30 messages per second
        assert abs(float(knob.input_value()) - target) < 1e-9

        # A second page on the same session: it joins with the current state, and a change made on
        # the first page reaches it as a `state` message.
        b = Page(browser, url)
        b.wait("window.musicrfm && window.musicrfm.hello !== null")
        b.wait(_coefficient_is("notes:C"), arg=target)
        assert abs(float(b.knob("notes:C").input_value()) - target) < 1e-9
        b_version = b.js("window.musicrfm.version")
        g_knob = a.knob("notes:G")
        box = g_knob.bounding_box()
        a.page.mouse.click(box["x"] + box["width"] * 0.75, box["y"] + box["height"] / 2)  # right of centre
        a.wait("window.musicrfm.state.directions['notes:G'] !== undefined")
        g = a.js("window.musicrfm.state.directions['notes:G'].coefficient")
        assert 0 < g <= cmax
        b.wait(_coefficient_is("notes:G"), arg=g)
        assert b.js("window.musicrfm.version") > b_version
        cause = b.js("window.musicrfm.lastState.cause")
        assert cause["client_id"] == hello["client_id"] and cause["via"] == "websocket"
        assert abs(float(b.knob("notes:G").input_value()) - g) < 1e-9
        expect(b.page.locator('.dir[data-key="notes:G"] input.active')).to_be_checked()

        # The gate slider and a schedule choice, from the second page back to the first.
        b.page.locator("#gate").focus()
        b.page.locator("#gate").press("Home")
        a.wait("window.musicrfm.state.gate.p === 0")
        expect(a.page.locator("#gate-value")).to_have_text("0.00")
        b.page.locator('.dir[data-key="notes:G"] select.schedule').select_option("fade_out")
        a.wait("window.musicrfm.state.directions['notes:G'].schedule.kind === 'fade_out'")
        applied = a.js("window.musicrfm.lastState")
        schedule = applied["state"]["directions"]["notes:G"]["schedule"]
        assert schedule["length"] == 500 and schedule["start"] == applied["step"]  # relative in the set
        expect(a.page.locator('.dir[data-key="notes:G"] select.schedule')).to_have_value("fade_out")
        b.page.locator("#gate").press("End")
        a.wait("window.musicrfm.state.gate.p === 1")

        # The prompt field: Enter applies it.
        a.page.fill("#prompt", "dark ambient drone")
        a.page.press("#prompt", "Enter")
        b.wait("window.musicrfm.state.prompt === 'dark ambient drone'")
        expect(b.page.locator("#prompt")).to_have_value("dark ambient drone")

        # Record: the toggle starts a recording on the server (both pages see it), and stops it.
        a.page.locator("#record").check()
        b.wait("window.musicrfm.recording && window.musicrfm.recording.status === 'started'")
        expect(b.page.locator("#record")).to_be_checked()
        wav = b.js("window.musicrfm.recording.wav")
        received = a.js("window.musicrfm.samplesReceived")
        a.wait("([n, d]) => window.musicrfm.samplesReceived > n + d", arg=[received, tenth])  # audio recorded
        a.page.locator("#record").uncheck()
        b.wait("window.musicrfm.recording.status === 'stopped'")
        expect(b.page.locator("#record")).not_to_be_checked()
        assert Path(wav).resolve().parent == Path(live_server.record_dir).resolve()
        assert Path(wav).stat().st_size > 44 + 2 * tenth  # a WAV header, then 16-bit samples

        # Still playing, and the plot draws the active directions.
        a.wait("(n) => window.musicrfm.samplesPlayed > n", arg=a.js("window.musicrfm.samplesPlayed"))
        expect(a.page.locator("#plot-legend .legend-item")).to_have_count(2)
        a.page.screenshot(path=SCREENSHOT, full_page=True)

        # Pause and stop from the buttons.
        a.page.click("#pause")
        b.wait("window.musicrfm.state.playback === 'paused'")
        a.page.click("#stop")
        b.wait("window.musicrfm.state.playback === 'stopped'")

        assert a.js("window.musicrfm.errors") == [] and b.js("window.musicrfm.errors") == []
        for p in (a, b):
            assert p.js_errors == []
            # Nothing but the server: every request to its origin, every socket to its /ws.
            assert p.requests and all(u.startswith(origin + "/") for u in p.requests), p.requests
            assert p.sockets and all(u.startswith(ws_origin + "/ws?") for u in p.sockets), p.sockets
            assert all(f"session={session}" in u for u in p.sockets)
    finally:
        for p in (a, b):
            if p is not None:
                p.close()


def test_page_schedules_match_the_engine_token_and_errors(browser, live_server):
    """The plot's client-side schedule maths agrees with engine.steering.Schedule; `?token=` reaches /ws;
    a server `error` is shown."""
    from playwright.sync_api import expect

    from musicrfm.engine.steering import Schedule

    session = f"web-{uuid.uuid4().hex[:8]}"
    page = Page(browser, f"{live_server.http_url}?session={session}&token=abc123")
    try:
        page.wait("window.musicrfm && window.musicrfm.hello !== null")
        assert page.sockets and all("token=abc123" in u and f"session={session}" in u for u in page.sockets)
        schedules = [
            Schedule(), Schedule("linear_rise", start=100, length=500), Schedule("linear_decay", start=0, length=300),
            Schedule("fade_in", start=50, length=400), Schedule("fade_out", start=50, length=400, curve="linear"),
            Schedule("exp_decay", start=20, lam=0.99), Schedule("logistic", center=300, width=60),
            Schedule("sine", period=700, phase=0.5), Schedule("keyframes", points=((100, 0.0), (400, 1.0), (900, 0.25))),
        ]
        steps = [0, 1, 49, 50, 99, 100, 101, 250, 300, 349, 450, 451, 600, 899, 900, 2000]
        for schedule in schedules:
            got = page.js("([s, steps]) => steps.map((t) => window.musicrfm.scheduleValue(s, t))",
                          [schedule.to_dict(), steps])
            want = [schedule(t) for t in steps]
            assert got == pytest.approx(want, abs=1e-12), schedule

        # An `error` from the server reaches the status line (and the state is left as it was).
        version = page.js("window.musicrfm.version")
        page.js("window.musicrfm.send({type: 'set', id: 'bad-1', directions: {'notes:H': {coefficient: 1}}})")
        page.wait("window.musicrfm.errors.length === 1")
        error = page.js("window.musicrfm.errors[0]")
        assert error["id"] == "bad-1" and "notes:H" in error["message"]
        expect(page.page.locator("#status .status-line.error").first).to_contain_text("notes:H")
        assert page.js("window.musicrfm.version") == version
        assert page.js_errors == []
    finally:
        page.close()


def test_page_works_in_token_mode(browser, test_bank_path, tmp_path):
    """With --token, the page and its files (app.js, the worklet, the stylesheet) need the token: the page
    is opened with ?token=, and hands its files the token by the cookie it is served with."""
    from live_server import start_server, stop_server

    server = start_server(test_bank_path, tmp_path / "rec", "--token", "t0k3n")
    page = None
    try:
        refused = Page(browser, f"{server.http_url}?session=web-token")
        assert refused.page.locator("body").inner_text().startswith("a token is required")
        refused.close()

        page = Page(browser, f"{server.http_url}?session=web-token&token=t0k3n")
        page.wait("window.musicrfm && window.musicrfm.connected && window.musicrfm.hello !== null")
        page.page.click("#play")
        page.wait("window.musicrfm.audioFrames >= 2 && window.musicrfm.samplesPlayed > 0", timeout_s=20)
        assert page.js("window.musicrfm.audio") == "worklet"  # worklet.js came through, without ?token=
        assert page.js("document.styleSheets[0].cssRules.length") > 0  # and the stylesheet
        assert not any("token=t0k3n" in u for u in page.requests[1:] if "/ws" not in u)  # by the cookie
        page.js("window.musicrfm.send({type: 'transport', command: 'stop'})")
        assert page.js_errors == []
    finally:
        if page is not None:
            page.close()
        assert stop_server(server) == 0
