"""The browser page (clients/web/) in headless Chromium against a real `musicrfm serve`, over a real socket.

Needs Playwright's Python package and /usr/bin/chromium; without them the test is skipped, except in CI
(the CI variable set), where it fails: CI installs both.
"""

from __future__ import annotations

import json
import math
import os
import re
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

    def __init__(self, browser, url: str, before=None):
        self.context = browser.new_context(viewport={"width": 1200, "height": 900}, accept_downloads=True)
        self.page = self.context.new_page()
        self.requests: list[str] = []
        self.sockets: list[str] = []
        self.sent: list[tuple[float, dict]] = []  # (time, control message) for each text frame sent
        self.js_errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("websocket", self._on_socket)
        self.page.on("pageerror", lambda e: self.js_errors.append(str(e)))
        self.page.on("console", lambda m: m.type == "error" and self.js_errors.append(m.text))
        if before is not None:  # e.g. a route on the page's WebSocket, set up before it connects
            before(self.page)
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

    def card(self, key: str, selector: str = ""):
        return self.page.locator(f'.dir[data-key="{key}"] {selector}'.strip())

    def sets_since(self, first: int) -> list[dict]:
        self.page.wait_for_timeout(50)  # lets Playwright deliver the pending framesent events
        return [m for _, m in self.sent[first:] if m.get("type") == "set"]

    def record_briefly(self) -> None:
        """Press record, let a little audio (3,200 samples) arrive, and stop: the recording has stopped on return."""
        self.page.locator("#record").check()
        self.wait("window.musicrfm.recording && window.musicrfm.recording.status === 'started'")
        received = self.js("window.musicrfm.samplesReceived")
        self.wait("(n) => window.musicrfm.samplesReceived > n + 3200", arg=received)
        self.page.locator("#record").uncheck()
        self.wait("window.musicrfm.recording.status === 'stopped'")

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
        expect(a.page.locator('.dir[data-key="notes:C"] input.coef')).to_have_value(str(target))
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
        # When each press reached the page (same clock as the page's log): on a loaded machine the
        # presses themselves can come slower than 30 a second, and then each may go out on its own.
        a.js("() => { window.__presses = []; document.addEventListener('keydown',"
             " () => window.__presses.push(performance.now()), true); }")
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
        assert all(g >= 1 / 30 - 0.002 for g in gaps), gaps  # <= 30 messages per second
        # Presses that come faster than the throttle are coalesced: at most one message per 1/30 s
        # window the presses spanned, plus the leading one and the trailing one with the final value.
        presses = [t / 1000 for t in a.js("window.__presses")]
        assert len(presses) == 40
        windows = math.ceil((presses[-1] - presses[0]) * 30)
        assert len(wire) <= min(40, windows + 2), (len(wire), presses[-1] - presses[0])
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
        # A recording downloads by the same cookie: its link carries no token.
        page.record_briefly()
        wav = Path(page.js("window.musicrfm.recording.wav"))
        link = page.page.locator("#downloads a").first
        assert link.get_attribute("href") == f"/recordings/{wav.name}"
        with page.page.expect_download() as info:
            link.click()
        assert Path(info.value.path()).read_bytes() == wav.read_bytes()
        page.js("window.musicrfm.send({type: 'transport', command: 'stop'})")
        assert page.js_errors == []
    finally:
        if page is not None:
            page.close()
        assert stop_server(server) == 0


# --- issue 15: the page's directions, prompts, schedules, knobs, stats, meter and downloads ----------------


def _session_url(server, **extra: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"session": f"web-{uuid.uuid4().hex[:8]}", **extra}.items())
    return f"{server.http_url}?{query}"


def test_page_groups_directions_by_concept_in_musical_order_and_suggests_the_models_prompts(browser, tmp_path):
    """The bundled model (musicgen-mini, its notes and chords banks): one heading per concept, notes by pitch,
    and the prompt field offers the model's own example prompts."""
    from musicrfm.engine.model import bundled_prompts
    from live_server import start_server, stop_server

    server = start_server(None, tmp_path / "rec", model=None)
    page = None
    try:
        page = Page(browser, _session_url(server))
        page.wait("window.musicrfm && window.musicrfm.hello !== null")
        hello = page.js("window.musicrfm.hello")
        assert hello["model"] == "musicgen-mini"
        examples = list(bundled_prompts("musicgen-mini"))
        assert examples and hello["example_prompts"] == examples
        groups = page.js("[...document.querySelectorAll('#directions .concept')].map((g) => [g.querySelector('h2')"
                         ".textContent, [...g.querySelectorAll('.dir')].map((d) => d.dataset.key)])")
        notes = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]
        assert groups == [["Notes", [f"notes:{n}" for n in notes]],
                          ["Chords", ["chords:major", "chords:minor", "chords:aug", "chords:dim"]],
                          ["Chord quality (on the root it holds)",
                           ["quality:major", "quality:minor", "quality:aug", "quality:dim"]]]
        assert page.page.locator("#prompt").get_attribute("placeholder") == f"text prompt, e.g. {examples[0]}"
        assert page.js("[...document.querySelectorAll('#prompt-examples option')].map((o) => o.value)") == examples
        assert page.js_errors == []
    finally:
        if page is not None:
            page.close()
        assert stop_server(server) == 0


def test_page_orders_any_bank_and_falls_back_to_a_generic_prompt(browser, live_server):
    page = Page(browser, _session_url(live_server))
    try:
        page.wait("window.musicrfm && window.musicrfm.hello !== null")
        assert page.js("window.musicrfm.hello.example_prompts") == []  # tiny-random: not a bundled model
        assert "random weights" in page.page.locator("#prompt").get_attribute("placeholder")
        keys = ["tempos:faster", "notes:B", "notes:Db", "notes:C#", "notes:C", "zz:b", "intervals:10",
                "intervals:2", "chords:sus2", "chords:dim", "chords:major", "time_signatures:12_8",
                "time_signatures:3_4"]
        got = page.js("(keys) => window.musicrfm.groupDirections(keys).map((g) => [g.title, g.keys])", keys)
        assert got == [["Notes", ["notes:C", "notes:C#", "notes:Db", "notes:B"]],
                       ["Intervals", ["intervals:2", "intervals:10"]],
                       ["Chords", ["chords:major", "chords:dim", "chords:sus2"]],
                       ["Tempos", ["tempos:faster"]],
                       ["Time signatures", ["time_signatures:3_4", "time_signatures:12_8"]],
                       ["Zz", ["zz:b"]]]
    finally:
        page.close()


def _schedule(page: Page, key: str) -> dict:
    return page.js("(k) => window.musicrfm.state.directions[k].schedule", key)


def test_page_schedules_take_their_length_or_period_in_seconds(browser, live_server):
    """50 steps = 1 s: the seconds typed on the page reach the state as steps, and show as seconds again."""
    from playwright.sync_api import expect

    url = _session_url(live_server)
    a, b = Page(browser, url), None
    try:
        a.wait("window.musicrfm && window.musicrfm.hello !== null")
        assert a.js("window.musicrfm.hello.frame_rate") == 50
        select, seconds, name = (a.card("notes:G", s) for s in ("select.schedule", "input.seconds", ".seconds-name"))
        expect(seconds).to_be_disabled()  # constant: nothing to time

        def kind_is(kind: str) -> None:
            a.wait("(k) => { const d = window.musicrfm.state.directions['notes:G']; return !!d && d.schedule &&"
                   " d.schedule.kind === k; }", arg=kind)

        def applied(field: str, value) -> None:
            a.wait("([f, v]) => { const s = window.musicrfm.state.directions['notes:G'].schedule;"
                   " return Math.abs(s[f] - v) < 1e-9; }", arg=[field, value])

        select.select_option("fade_in")
        kind_is("fade_in")
        assert _schedule(a, "notes:G")["length"] == 500  # 10 s to start with
        expect(name).to_have_text("length")
        expect(seconds).to_have_value("10")
        seconds.fill("4")
        seconds.press("Enter")
        applied("length", 200)
        select.select_option("fade_out")  # the same timing: the length carries over
        kind_is("fade_out")
        assert _schedule(a, "notes:G")["length"] == 200
        expect(seconds).to_have_value("4")

        select.select_option("sine")
        kind_is("sine")
        assert _schedule(a, "notes:G")["period"] == 500
        expect(name).to_have_text("period")
        seconds.fill("2.5")
        seconds.press("Enter")
        applied("period", 125)

        select.select_option("exp_decay")
        kind_is("exp_decay")
        assert _schedule(a, "notes:G")["lam"] == pytest.approx(0.5 ** (1 / 150))  # halves every 3 s
        expect(name).to_have_text("half-life")
        seconds.fill("1")
        seconds.press("Enter")
        applied("lam", 0.5 ** (1 / 50))

        select.select_option("logistic")
        kind_is("logistic")
        last = a.js("window.musicrfm.lastState")
        schedule = last["state"]["directions"]["notes:G"]["schedule"]
        assert schedule["width"] == 50 and schedule["center"] - last["step"] == 250  # relative: from now
        expect(name).to_have_text("width")

        # A timing that is not a positive number of seconds is not sent, and the field shows the state again.
        first, version = len(a.sent), a.js("window.musicrfm.version")
        for bad in ("0", "-3", "100000"):
            seconds.fill(bad)
            seconds.press("Enter")
            expect(a.page.locator("#status .status-line.error").first).to_contain_text("number of seconds")
            expect(seconds).to_have_value("1")
        assert a.sets_since(first) == [] and a.js("window.musicrfm.version") == version

        # Another page shows the timing in seconds, from the state.
        b = Page(browser, url)
        b.wait("window.musicrfm && window.musicrfm.hello !== null")
        expect(b.card("notes:G", "select.schedule")).to_have_value("logistic")
        expect(b.card("notes:G", "input.seconds")).to_have_value("1")
        select.select_option("constant")
        kind_is("constant")
        expect(seconds).to_be_disabled()
        expect(b.card("notes:G", "input.seconds")).to_be_disabled()
        assert a.js("window.musicrfm.errors") == [] and a.js_errors == []
    finally:
        for p in (a, b):
            if p is not None:
                p.close()


def test_page_knob_shows_and_takes_typed_values_and_keeps_values_beyond_its_range(browser, live_server):
    from playwright.sync_api import expect

    from live_client import LiveClient

    url = _session_url(live_server)
    session = url.split("session=")[1]
    a = Page(browser, url)
    try:
        a.wait("window.musicrfm && window.musicrfm.hello !== null")
        cmax = a.js("window.musicrfm.hello.limits.coefficient_max")
        # the page says what a strength means (the hello's units)
        expect(a.page.locator("#strength-units")).to_contain_text("relative to each layer's typical activation size")
        coef, knob = a.card("notes:C", "input.coef"), a.knob("notes:C")
        bounds = "(e) => [Number(e.min), Number(e.max), Number(e.value)]"

        # A typed value goes out as the knob's own `set`, and the knob moves to it.
        first = len(a.sent)
        coef.fill("0.75")
        coef.press("Enter")
        a.wait(_coefficient_is("notes:C"), arg=0.75)
        sent = a.sets_since(first)
        assert [{k: v for k, v in m.items() if k != "id"} for m in sent] == [
            {"type": "set", "directions": {"notes:C": {"coefficient": 0.75}}}]
        assert knob.evaluate(bounds) == [-cmax, cmax, 0.75]

        # Not a number: nothing is sent, the page says why, and the field shows the state again.
        first = len(a.sent)
        coef.fill("")
        coef.press("Enter")
        expect(a.page.locator("#status .status-line.error").first).to_contain_text("must be a number")
        expect(coef).to_have_value("0.75")
        assert a.sets_since(first) == []

        with LiveClient(live_server.ws_url(session)) as other:
            # Another client's value beyond the knob's range is shown as is: the number, and the knob (whose
            # range widens to hold it).
            assert other.request({"type": "set", "id": "o-5", "directions": {"notes:C": {"coefficient": 5}}})[
                "type"] == "state"
            a.wait(_coefficient_is("notes:C"), arg=5)
            expect(coef).to_have_value("5")
            expect(a.card("notes:C")).to_have_class(re.compile(r"\bbeyond\b"))
            assert knob.evaluate(bounds) == [-5, 5, 5]

            # Using the card's other controls leaves it as it is.
            first = len(a.sent)
            a.card("notes:C", "label.switch").click()
            a.wait("window.musicrfm.state.directions['notes:C'].active === false")
            a.card("notes:C", "label.switch").click()
            a.wait("window.musicrfm.state.directions['notes:C'].active === true")
            a.card("notes:C", "select.schedule").select_option("fade_in")
            a.wait("window.musicrfm.state.directions['notes:C'].schedule.kind === 'fade_in'")
            assert other.get_state()["state"]["directions"]["notes:C"]["coefficient"] == 5
            assert all("coefficient" not in m["directions"]["notes:C"] for m in a.sets_since(first))
            expect(coef).to_have_value("5")

            # Touching the knob goes on from the value shown.
            knob.focus()
            knob.press("ArrowLeft")
            a.wait(_coefficient_is("notes:C"), arg=4.99)
            expect(coef).to_have_value("4.99")

            # Back within range, the knob's range is the hello's again.
            inside = -0.5 * cmax
            other.request({"type": "set", "id": "o-1", "directions": {"notes:C": {"coefficient": inside}}})
            a.wait(_coefficient_is("notes:C"), arg=inside)
            # (A knob touched in the last 0.4 s keeps the user's value that long, then shows the state.)
            expect(coef).to_have_value(f"{inside:g}")
            expect(a.card("notes:C")).not_to_have_class(re.compile(r"\bbeyond\b"))
            assert knob.evaluate(bounds) == [-cmax, cmax, inside]
        assert a.js("window.musicrfm.errors") == [] and a.js_errors == []
    finally:
        a.close()


def test_page_stats_say_what_they_mean_and_count_underruns_from_joining(browser, live_server):
    """The stats footer explains lead and underruns, and shows the session's underruns since this page
    joined: stats messages are put into the page's own WebSocket (the rest goes to and from the server)."""
    from playwright.sync_api import expect

    routes = []

    def route(page) -> None:
        def handler(ws) -> None:
            ws.connect_to_server()  # everything else passes between the page and the server
            routes.append(ws)

        page.route_web_socket(re.compile(r".*/ws\?.*"), handler)

    page = Page(browser, _session_url(live_server), before=route)
    try:
        page.wait("window.musicrfm && window.musicrfm.hello !== null")
        assert routes
        stats = {"type": "stats", "epoch": 0, "step": 100, "seconds": 2.0, "lead_seconds": 0.48,
                 "realtime_factor": 1.5, "listeners": 1, "playback": "stopped"}
        routes[-1].send(json.dumps({**stats, "underruns": 7}))  # the session had 7 before this page came
        page.wait("window.musicrfm.stats && window.musicrfm.stats.underruns === 7")
        expect(page.page.locator("#stats")).to_contain_text("server underruns 0")
        routes[-1].send(json.dumps({**stats, "step": 150, "underruns": 9}))
        page.wait("window.musicrfm.serverUnderruns === 2")
        expect(page.page.locator("#stats")).to_contain_text("server underruns 2")
        titles = page.js("Object.fromEntries([...document.querySelectorAll('#stats .stat')]"
                         ".map((e) => [e.textContent.split(' ')[0], e.title]))")
        assert "ahead of real time" in titles["lead"]
        assert "fell behind real time" in titles["server"] and "since this page joined" in titles["server"]
        assert "ran out of audio" in titles["here:"]
        assert page.js_errors == []
    finally:
        page.close()


def test_page_meter_text_matches_its_bar_and_a_recording_can_be_downloaded(browser, live_server):
    from playwright.sync_api import expect

    page = Page(browser, _session_url(live_server))
    try:
        page.wait("window.musicrfm && window.musicrfm.hello !== null")
        expect(page.page.locator("#recordings")).to_be_hidden()
        page.page.click("#play")
        page.wait("window.musicrfm.meter && window.musicrfm.meter.fraction > 0", timeout_s=20)
        # Bar and text from one reading: the text's dB is where the bar ends on its -60..0 dB scale.
        for _ in range(5):
            reading, width, text = page.js("[window.musicrfm.meter, document.getElementById('meter-rms').style.width,"
                                           " document.getElementById('meter-text').textContent]")
            assert text == f"{reading['db']} dB rms" or reading["fraction"] == 0
            assert width.endswith("%") and float(width[:-1]) == pytest.approx(reading["fraction"] * 100, abs=0.006)
            assert reading["fraction"] == pytest.approx((reading["db"] + 60) / 60)
            page.page.wait_for_timeout(150)
        page.page.locator("#mute").check()
        page.wait("document.getElementById('meter-text').textContent === '-∞ dB rms'", timeout_s=5)
        assert page.js("document.getElementById('meter-rms').style.width") in ("0%", "0.00%")

        # Record: once it stops, the page offers the WAV and the log, and they download as they are on disk.
        page.record_briefly()
        done = page.js("window.musicrfm.recording")
        expect(page.page.locator("#recordings")).to_be_visible()
        links = page.page.locator("#downloads li").first.locator("a")
        expect(links).to_have_count(2)
        for link, path in zip((links.nth(0), links.nth(1)), (done["wav"], done["log"])):
            name = Path(path).name
            assert link.get_attribute("href") == f"/recordings/{name}"
            with page.page.expect_download() as info:
                link.click()
            download = info.value
            assert download.suggested_filename == name
            assert Path(download.path()).read_bytes() == Path(path).read_bytes()
        page.page.click("#stop")
        page.wait("window.musicrfm.state.playback === 'stopped'")
        assert page.js("window.musicrfm.errors") == [] and page.js_errors == []
    finally:
        page.close()
