// musicrfm browser client: one WebSocket to the session (docs/protocol.md), controls, playback and a
// plot of the steering strength. No libraries and nothing fetched from anywhere but this server.
"use strict";

(() => {
  // ---- constants -------------------------------------------------------------------------------------

  const HEADER_MIN_BYTES = 40;
  const SEND_INTERVAL_MS = 34;          // continuous controls send at most ~30 messages per second
  const BUSY_MS = 400;                  // a control the user touched this recently is not overwritten
  const PLOT_PAST_SECONDS = 10;
  const PLOT_FUTURE_SECONDS = 5;
  const HISTORY_MAX = 4000;
  const RECEIVED_MAX = 200;

  const SCHEDULE_KINDS = ["constant", "linear_rise", "linear_decay", "fade_in", "fade_out", "sine",
                          "exp_decay", "logistic"];
  // The one timing each schedule takes from the page, in seconds (steps = seconds x the hello's frame_rate,
  // 50 steps = 1 s), and the seconds a kind starts with. Schedules in a `set` are relative to the step at
  // which it applies: sending one (re)starts it there.
  const SCHEDULE_TIMING = {
    linear_rise: {name: "length", seconds: 10},
    linear_decay: {name: "length", seconds: 10},
    fade_in: {name: "length", seconds: 10},
    fade_out: {name: "length", seconds: 10},
    sine: {name: "period", seconds: 10},
    exp_decay: {name: "half-life", seconds: 3},
    logistic: {name: "width", seconds: 1},
  };
  const SCHEDULE_MAX_SECONDS = 3600;  // an hour: longer is a constant for any performance
  // Concepts in SynTheory's order (probes/syntheory.py CONCEPTS); others follow by name.
  // "quality": the quality controls (engine/steering.py QUALITY_TONES), beside the chords they change.
  const CONCEPT_ORDER = ["notes", "intervals", "scales", "chords", "quality", "chord_progressions", "tempos",
                         "time_signatures"];
  const CONCEPT_TITLES = {quality: "Chord quality (on the root it holds)"};
  // Classes in a musical order where the bank's (alphabetical) one is not: pitch names are ordered by pitch.
  const CLASS_ORDER = {
    chords: ["major", "minor", "aug", "dim"],
    quality: ["major", "minor", "aug", "dim"],
    scales: ["ionian", "dorian", "phrygian", "lydian", "mixolydian", "aeolian", "locrian"],
  };
  const NATURAL_PITCH = {C: 0, D: 2, E: 4, F: 5, G: 7, A: 9, B: 11};
  const METER_FLOOR_DB = -60;           // the level meter's scale: -60 dB (empty) to 0 dB (full)
  // The engine's defaults (engine/steering.py Schedule) for fields a schedule object leaves out.
  const SCHEDULE_DEFAULTS = {start: 0, length: 1500, lam: 0.998, center: 750, width: 200, period: 1500,
                             phase: 0, curve: "equal_power"};

  // ---- the debug / test object -----------------------------------------------------------------------

  const dbg = {
    connected: false,
    hello: null,
    state: null,          // the control state (the `state` field of the last hello / state message)
    lastState: null,      // the whole last `state` message (version, epoch, step, cause)
    version: null,
    epoch: null,
    step: null,
    audioFrames: 0,
    samplesReceived: 0,
    lastHeader: null,
    errors: [],
    warnings: [],
    stats: null,
    serverUnderruns: null, // the session's underruns since this page joined (stats count from the session's start)
    recording: null,
    downloads: [],        // the recordings this page has seen finish: {wav, log} links, newest first
    received: [],         // the last RECEIVED_MAX control messages, newest last
    sent: 0,
    sentLog: [],          // the last RECEIVED_MAX messages sent: {n: 1, 2, ..., t: performance.now() ms, msg}
    samplesPlayed: 0,
    underruns: 0,
    overruns: 0,
    buffered: 0,
    position: null,       // stream sample index being played, from the worklet
    level: {rms: 0, peak: 0},
    meter: null,          // what the level meter shows: {db, fraction, text} (one reading for bar and text)
    audio: "off",         // off | starting | worklet | script-processor | failed
    send: (msg) => send(msg),
  };
  window.musicrfm = dbg;

  // ---- elements --------------------------------------------------------------------------------------

  const $ = (id) => document.getElementById(id);
  const el = {
    session: $("session"), model: $("model"), connection: $("connection"), noiseNote: $("noise-note"),
    play: $("play"), pause: $("pause"), stop: $("stop"), record: $("record"), mute: $("mute"),
    playback: $("playback"), meterRms: $("meter-rms"), meterPeak: $("meter-peak"), meterText: $("meter-text"),
    promptForm: $("prompt-form"), prompt: $("prompt"), promptExamples: $("prompt-examples"), gate: $("gate"),
    gateValue: $("gate-value"), recordings: $("recordings"), downloads: $("downloads"),
    strengthUnits: $("strength-units"),
    plot: $("plot"), legend: $("plot-legend"), directions: $("directions"), status: $("status"), stats: $("stats"),
  };

  // ---- connection ------------------------------------------------------------------------------------

  const params = new URLSearchParams(location.search);
  const session = params.get("session") || "main";
  const token = params.get("token");
  el.session.textContent = `session ${session}`;

  let ws = null;
  let retryMs = 500;
  let nextId = 1;

  function wsUrl() {
    const query = new URLSearchParams({session});
    if (token) query.set("token", token);
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    return `${scheme}//${location.host}/ws?${query}`;
  }

  function connect() {
    setConnection("connecting…", false);
    ws = new WebSocket(wsUrl());
    ws.binaryType = "arraybuffer";
    ws.onopen = () => { retryMs = 500; setConnection("connected", true); };
    ws.onmessage = (event) => {
      if (typeof event.data === "string") {
        let msg;
        try { msg = JSON.parse(event.data); } catch (e) { status(`unreadable message from the server: ${e}`, "error"); return; }
        onControl(msg);
      } else {
        onBinary(event.data);
      }
    };
    ws.onclose = (event) => {
      dbg.connected = false;
      const why = event.code === 1013 ? " (this client fell behind)" : event.code === 1008 ? " (refused: token?)" :
        event.reason ? ` (${event.reason})` : "";
      setConnection(`disconnected${why}; retrying`, false);
      setStreaming(false);
      setTimeout(connect, retryMs);
      retryMs = Math.min(retryMs * 2, 10000);
    };
    ws.onerror = () => {};  // onclose follows and reports
  }

  function setConnection(text, ok) {
    el.connection.textContent = text;
    el.connection.classList.toggle("off", !ok);
    el.connection.classList.toggle("on", ok);
  }

  // `at`: when the decision to send was taken (the throttle's clock), for the log.
  function send(msg, at = performance.now()) {
    if (!ws || ws.readyState !== WebSocket.OPEN) {
      status("not connected: the change was not sent", "error");
      return false;
    }
    ws.send(JSON.stringify(msg));
    dbg.sent++;
    dbg.sentLog.push({n: dbg.sent, t: at, msg});
    if (dbg.sentLog.length > RECEIVED_MAX) dbg.sentLog.shift();
    return true;
  }

  function sendUi(msg, at) {
    msg.id = `web-${nextId++}`;
    return send(msg, at);
  }

  // Continuous controls: at most one message per SEND_INTERVAL_MS per channel, the last value always sent.
  const throttles = new Map();
  function throttledSend(channel, makeMsg) {
    let t = throttles.get(channel);
    if (!t) { t = {last: -Infinity, timer: null, make: null}; throttles.set(channel, t); }
    t.make = makeMsg;
    const wait = t.last + SEND_INTERVAL_MS - performance.now();
    if (wait <= 0) flushThrottle(channel);
    else if (!t.timer) t.timer = setTimeout(() => flushThrottle(channel), wait);
  }
  function flushThrottle(channel) {
    const t = throttles.get(channel);
    if (!t) return;
    if (t.timer) { clearTimeout(t.timer); t.timer = null; }
    if (!t.make) return;
    const make = t.make;
    t.make = null;
    t.last = performance.now();
    sendUi(make(), t.last);
  }

  // ---- server messages -------------------------------------------------------------------------------

  function onControl(msg) {
    dbg.received.push(msg);
    if (dbg.received.length > RECEIVED_MAX) dbg.received.shift();
    switch (msg.type) {
      case "hello": onHello(msg); break;
      case "state": onState(msg); break;
      case "error":
        dbg.errors.push(msg);
        status(`error: ${msg.message}`, "error");
        applyState();  // a refused change: show the state as it is
        break;
      case "warning":
        dbg.warnings.push(msg);
        status(`warning: ${msg.message}`, "warning");
        break;
      case "stats": onStats(msg); break;
      case "recording": onRecording(msg); break;
      default: break;  // newer servers may send more: ignore what we do not know
    }
  }

  function onHello(msg) {
    dbg.hello = msg;
    dbg.connected = true;
    el.model.textContent = `model: ${msg.model}`;
    el.noiseNote.hidden = !msg.random_weights;
    el.noiseNote.textContent = msg.random_weights
      ? (msg.note || "random weights: the audio is noise, not music") : "";
    showPromptExamples(msg);
    showStrengthUnits(msg);
    underrunBase = null;  // a new join: count the session's underruns from here
    buildDirections(msg.directions || []);
    timeline.length = 0;
    timelineEpoch = null;
    takeState(msg);
  }

  // The knob's range, -this .. +this: the one place the page reads it (the hello's `limits`).
  function knobRange() {
    const limits = dbg.hello && dbg.hello.limits;
    const max = limits ? Number(limits.coefficient_max) : NaN;
    return Number.isFinite(max) && max > 0 ? max : 2;
  }

  // What a knob's number means (the hello's `strength`): relative units are a fraction of each layer's typical
  // activation norm, the same on every model; raw units are the model's own hidden-state units.
  function showStrengthUnits(msg) {
    const s = msg.strength || {};
    el.strengthUnits.textContent = s.units === "raw"
      ? `strength in raw hidden-state units (the knob's top: ${knobRange()})`
      : `strength relative to each layer's typical activation size: 0.5 = half of it (an audible pull), ` +
        `1 = all of it (the knob's top: ${knobRange()})`;
  }

  function frameRate() { return (dbg.hello && dbg.hello.frame_rate) || 50; }

  // The placeholder and suggestions name prompts the loaded model knows (a bundled model's example prompts).
  function showPromptExamples(msg) {
    const examples = Array.isArray(msg.example_prompts)
      ? msg.example_prompts.filter((p) => typeof p === "string" && p) : [];
    el.prompt.placeholder = examples.length ? `text prompt, e.g. ${examples[0]}`
      : msg.random_weights ? "text prompt (random weights: any prompt gives noise)"
        : "text prompt, e.g. warm lofi piano";
    el.promptExamples.textContent = "";
    for (const text of examples) {
      const option = document.createElement("option");
      option.value = text;
      el.promptExamples.append(option);
    }
  }

  function onState(msg) {
    if (dbg.version !== null && msg.version < dbg.version) return;  // versions only grow: an old one
    dbg.lastState = msg;
    takeState(msg);
  }

  function takeState(msg) {
    dbg.state = msg.state;
    dbg.version = msg.version;
    dbg.epoch = msg.epoch;
    dbg.step = msg.step;
    remember(msg.epoch, msg.step, msg.state);
    applyState();
  }

  // The session counts underruns from its start; a page shows those since it joined (the first count it sees).
  let underrunBase = null;

  // The footer: each figure with a tooltip saying what it measures (docs/protocol.md, `stats`).
  function onStats(msg) {
    dbg.stats = msg;
    const total = Number(msg.underruns) || 0;
    if (underrunBase === null || total < underrunBase) underrunBase = total;
    dbg.serverUnderruns = total - underrunBase;
    const parts = [[`step ${msg.step}`, "the generation step the server has reached (50 steps = 1 s)"]];
    if (msg.seconds !== undefined) {
      parts.push([`${Number(msg.seconds).toFixed(1)} s`, "audio generated in this stream"]);
    }
    if (msg.lead_seconds !== undefined) {
      parts.push([`lead ${Number(msg.lead_seconds).toFixed(2)} s`,
        "lead: audio the server has generated ahead of real time. A change is heard about this much " +
        "(plus a chunk) after it is made"]);
    }
    if (msg.realtime_factor !== undefined) {
      parts.push([`${Number(msg.realtime_factor).toFixed(2)}× real time`,
        "seconds of audio generated per second of work: below 1× the server cannot keep up"]);
    }
    if (msg.listeners !== undefined) {
      parts.push([`${msg.listeners} listener${msg.listeners === 1 ? "" : "s"}`, "clients hearing this session"]);
    }
    parts.push([`server underruns ${dbg.serverUnderruns}`,
      "underruns: times generation fell behind real time (the audio stuttered for every listener), " +
      "since this page joined"]);
    parts.push([`here: buffered ${dbg.buffered.toFixed(2)} s, underruns ${dbg.underruns}`,
      "this page's player: audio waiting to be played, and the times it ran out of audio (a gap heard here)"]);
    el.stats.textContent = "";
    parts.forEach(([text, title], i) => {
      if (i) el.stats.append(" · ");
      const span = document.createElement("span");
      span.className = "stat";
      span.textContent = text;
      span.title = title;
      el.stats.append(span);
    });
  }

  function onRecording(msg) {
    dbg.recording = msg;
    el.record.checked = isRecording();
    if (msg.status === "stopped" && msg.wav) {
      status(`recording saved: ${msg.wav}`, "info");
      offerDownload(msg);
    } else if (isRecording()) status(`recording${msg.wav ? ` to ${msg.wav}` : ""}`, "info");
  }

  // GET /recordings/NAME serves a file of the server's record dir by its name (docs/protocol.md); the
  // message names it by its path on the server.
  const RECORDING_NAME = /^[A-Za-z0-9_-]{1,200}\.(wav|jsonl)$/;
  const DOWNLOADS_SHOWN = 5;
  function recordingLink(path, text) {
    const name = String(path || "").split(/[\\/]/).pop();
    if (!RECORDING_NAME.test(name)) return null;
    const a = document.createElement("a");
    a.href = `/recordings/${encodeURIComponent(name)}`;
    a.download = name;
    a.textContent = text || name;
    a.title = `download ${name} (on the server: ${path})`;
    return a;
  }

  function offerDownload(msg) {
    const wav = recordingLink(msg.wav);
    if (!wav) return;
    const log = recordingLink(msg.log, "log");
    const item = document.createElement("li");
    item.append(wav);
    if (log) item.append(" · ", log);
    const frames = Array.isArray(msg.frames) ? msg.frames : [];
    if (typeof frames[0] === "number" && typeof frames[1] === "number") {
      const span = document.createElement("span");
      span.className = "small";
      span.textContent = ` ${((frames[1] - frames[0]) / frameRate()).toFixed(1)} s`;
      item.append(span);
    }
    el.downloads.prepend(item);
    while (el.downloads.childElementCount > DOWNLOADS_SHOWN) el.downloads.lastElementChild.remove();
    el.recordings.hidden = false;
    dbg.downloads.unshift({wav: wav.href, log: log ? log.href : null});
    dbg.downloads.length = Math.min(dbg.downloads.length, DOWNLOADS_SHOWN);
  }

  function isRecording() {
    const s = dbg.recording && dbg.recording.status;
    return !!s && !["stopped", "finished", "failed", "error", "off"].includes(s);
  }

  function onBinary(buffer) {
    if (buffer.byteLength < 4) return;
    const head = new Uint8Array(buffer, 0, 4);
    if (head[0] !== 0x4d || head[1] !== 0x52 || head[2] !== 0x46 || head[3] !== 0x41) return;  // not "MRFA"
    if (buffer.byteLength < HEADER_MIN_BYTES) { status("short audio frame ignored", "error"); return; }
    const v = new DataView(buffer);
    const size = v.getUint16(6, true);
    const header = {
      headerVersion: v.getUint16(4, true),
      headerBytes: size,
      controlVersion: v.getUint32(8, true),
      sampleRate: v.getUint32(12, true),
      firstSample: v.getUint32(16, true) + v.getUint32(20, true) * 4294967296,
      stepStart: v.getUint32(24, true),
      stepEnd: v.getUint32(28, true),
      epoch: v.getUint32(32, true),
      numSamples: v.getUint32(36, true),
    };
    if (size < HEADER_MIN_BYTES || size + header.numSamples * 4 > buffer.byteLength) {
      status("malformed audio frame ignored", "error");
      return;
    }
    const pcm = new Float32Array(header.numSamples);
    if (littleEndian && size % 4 === 0) pcm.set(new Float32Array(buffer, size, header.numSamples));
    else for (let i = 0; i < header.numSamples; i++) pcm[i] = v.getFloat32(size + 4 * i, true);
    dbg.audioFrames++;
    dbg.samplesReceived += header.numSamples;
    dbg.lastHeader = header;
    dbg.lastHeaderAt = performance.now();
    playPcm(pcm, header);
  }
  const littleEndian = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;

  // ---- playback --------------------------------------------------------------------------------------

  let ctx = null;
  let port = null;           // the processor's message port (AudioWorklet or the fallback)
  let pending = [];          // PCM that arrived while the processor was loading
  let reportAt = 0;

  function ensureAudio() {
    if (ctx) {
      if (ctx.state !== "running") ctx.resume();
      return;
    }
    dbg.audio = "starting";
    ctx = new AudioContext({latencyHint: "interactive"});
    ctx.resume();
    const ready = ctx.audioWorklet
      ? ctx.audioWorklet.addModule("worklet.js").then(() => {
        const node = new AudioWorkletNode(ctx, "musicrfm-player", {numberOfInputs: 0, outputChannelCount: [1]});
        node.connect(ctx.destination);
        dbg.audio = "worklet";
        return node.port;
      })
      : scriptProcessorFallback(ctx);  // no AudioWorklet outside secure contexts (plain http off localhost)
    ready.then((p) => {
      port = p;
      port.onmessage = (event) => onReport(event.data);
      port.postMessage({type: "mute", value: el.mute.checked});
      port.postMessage({type: "streaming", value: streaming});
      for (const item of pending) port.postMessage(item, [item.pcm.buffer]);
      pending = [];
    }).catch((e) => {
      dbg.audio = "failed";
      status(`audio could not start: ${e}`, "error");
    });
  }

  // Runs the same processor (worklet.js) on the main thread through a ScriptProcessorNode.
  function scriptProcessorFallback(context) {
    return new Promise((resolve, reject) => {
      let Processor = null;
      window.sampleRate = context.sampleRate;
      window.AudioWorkletProcessor = class {
        constructor() {
          const channel = new MessageChannel();
          this.port = channel.port1;
          this.outside = channel.port2;
        }
      };
      window.registerProcessor = (name, cls) => { Processor = cls; };
      const script = document.createElement("script");
      script.src = "worklet.js";
      script.onerror = () => reject(new Error("worklet.js did not load"));
      script.onload = () => {
        const proc = new Processor();
        const node = context.createScriptProcessor(2048, 1, 1);
        node.onaudioprocess = (event) => {
          const out = event.outputBuffer.getChannelData(0);
          for (let off = 0; off < out.length; off += 128) proc.process([], [[out.subarray(off, off + 128)]]);
        };
        node.connect(context.destination);
        dbg.audio = "script-processor";
        status("audio: AudioWorklet needs https or localhost; using the slower ScriptProcessor", "warning");
        resolve(proc.outside);
      };
      document.head.appendChild(script);
    });
  }

  function playPcm(pcm, header) {
    const item = {type: "pcm", pcm, rate: header.sampleRate, firstSample: header.firstSample, epoch: header.epoch};
    if (port) port.postMessage(item, [pcm.buffer]);
    else if (ctx) {
      pending.push(item);
      while (pending.length > 200) pending.shift();
    }
  }

  function onReport(r) {
    if (r.type !== "report") return;
    dbg.samplesPlayed = r.samplesPlayed;
    dbg.underruns = r.underruns;
    dbg.overruns = r.overruns;
    dbg.buffered = r.buffered;
    dbg.level = {rms: r.rms, peak: r.peak};
    dbg.position = r.position === null ? null : {sample: r.position, epoch: r.epoch, rate: r.streamRate};
    dbg.contextRate = r.contextRate;
    reportAt = performance.now();
    drawMeter(r.rms, r.peak);
  }

  let streaming = false;
  function setStreaming(value) {
    streaming = value;
    if (port) port.postMessage({type: "streaming", value});
  }

  function db(x) { return x > 0 ? 20 * Math.log10(x) : -Infinity; }

  // One reading of the RMS level drives both the bar and its text: the dB value, rounded to what the text
  // shows, and clamped to the bar's scale.
  function meterReading(rms) {
    const d = db(rms);
    if (!(d > METER_FLOOR_DB)) {
      return {db: METER_FLOOR_DB, fraction: 0, text: d === -Infinity ? "-∞ dB rms" : `< ${METER_FLOOR_DB} dB rms`};
    }
    const shown = Math.min(0, Math.round(d));
    return {db: shown, fraction: (shown - METER_FLOOR_DB) / -METER_FLOOR_DB, text: `${shown} dB rms`};
  }

  function drawMeter(rms, peak) {
    const reading = meterReading(rms);
    dbg.meter = reading;
    el.meterRms.style.width = `${(reading.fraction * 100).toFixed(2)}%`;
    el.meterText.textContent = reading.text;
    const peakDb = Math.max(METER_FLOOR_DB, Math.min(0, db(peak)));
    el.meterPeak.style.left = `${((peakDb - METER_FLOOR_DB) / -METER_FLOOR_DB * 100).toFixed(2)}%`;
    el.meterRms.classList.toggle("hot", peak >= 0.99);
  }

  // ---- controls --------------------------------------------------------------------------------------

  const rows = new Map();     // direction key -> {root, knob, coef, active, schedule, seconds, color, ...}
  let dragging = null;        // the range input under the pointer
  const touched = new WeakMap();  // element -> time of the user's last input

  function markTouched(e) { touched.set(e, performance.now()); }
  function busy(e) {
    if (e === dragging) return true;
    const t = touched.get(e);
    return t !== undefined && performance.now() - t < BUSY_MS;
  }
  let resyncTimer = null;
  function resyncSoon() {
    if (resyncTimer) return;
    resyncTimer = setTimeout(() => { resyncTimer = null; applyState(); }, BUSY_MS + 50);
  }

  function colorOf(index) { return `hsl(${(index * 137.508) % 360}, 75%, 62%)`; }

  // ---- the order of directions: one group per concept, classes in musical order ----

  function splitKey(key) {
    const at = key.indexOf(":");
    return at < 0 ? ["", key] : [key.slice(0, at), key.slice(at + 1)];
  }

  // C = 0 ... B = 11 for a pitch name (C, C#, Db, F♯ ...); null for anything else.
  function pitchClass(name) {
    const m = /^([A-G])([#b♯♭]*)$/.exec(name);
    if (!m) return null;
    let pc = NATURAL_PITCH[m[1]];
    for (const c of m[2]) pc += c === "#" || c === "♯" ? 1 : -1;
    return ((pc % 12) + 12) % 12;
  }

  function classRank(concept, name) {
    const pc = pitchClass(name);
    if (pc !== null) return pc;
    const known = (CLASS_ORDER[concept] || []).indexOf(name);
    return known >= 0 ? 100 + known : 1000;  // then the rest, by name
  }

  const byName = (a, b) => a.localeCompare(b, "en", {numeric: true});

  function conceptTitle(concept) {
    if (!concept) return "Other";
    if (CONCEPT_TITLES[concept]) return CONCEPT_TITLES[concept];
    const words = concept.replace(/_/g, " ");
    return words[0].toUpperCase() + words.slice(1);
  }

  // [{concept, title, keys}] in CONCEPT_ORDER (others by name), each concept's keys in musical order.
  function groupDirections(keys) {
    const groups = new Map();
    for (const key of keys) {
      const [concept] = splitKey(key);
      if (!groups.has(concept)) groups.set(concept, []);
      groups.get(concept).push(key);
    }
    const rank = (c) => { const i = CONCEPT_ORDER.indexOf(c); return i >= 0 ? i : CONCEPT_ORDER.length; };
    return [...groups.keys()].sort((a, b) => rank(a) - rank(b) || byName(a, b)).map((concept) => {
      const classOf = (key) => splitKey(key)[1];
      const sorted = groups.get(concept).slice().sort((a, b) =>
        classRank(concept, classOf(a)) - classRank(concept, classOf(b)) || byName(classOf(a), classOf(b)));
      return {concept, title: conceptTitle(concept), keys: sorted};
    });
  }

  // ---- schedules' timing in seconds ----

  function secondsText(x) { return String(Math.round(x * 100) / 100); }

  // The schedule a `set` carries for `kind` with its timing `seconds` (SCHEDULE_TIMING), in steps.
  function scheduleFor(kind, seconds) {
    const steps = Math.max(1, Math.round(seconds * frameRate()));
    switch (kind) {
      case "linear_rise": case "linear_decay": case "fade_in": case "fade_out": return {kind, length: steps};
      case "sine": return {kind, period: steps};
      case "exp_decay": return {kind, lam: Math.pow(0.5, 1 / steps)};             // halves every `steps`
      case "logistic": return {kind, center: 5 * steps, width: steps};          // from ~0 to 1 over 10 widths
      default: return {kind};
    }
  }

  // The timing of a schedule object in seconds (the inverse of scheduleFor); null when it has none.
  function scheduleSeconds(schedule) {
    const s = {...SCHEDULE_DEFAULTS, ...(schedule || {kind: "constant"})};
    const fps = frameRate();
    switch (s.kind) {
      case "linear_rise": case "linear_decay": case "fade_in": case "fade_out": return s.length / fps;
      case "sine": return s.period / fps;
      case "exp_decay": return s.lam < 1 ? Math.log(0.5) / Math.log(s.lam) / fps : null;
      case "logistic": return s.width / fps;
      default: return null;
    }
  }

  // A typed number of seconds, or null (and the reason said) when it is not one the page sends.
  function validSeconds(text) {
    const v = Number(text);
    if (text.trim() === "" || !Number.isFinite(v) || v <= 0 || v > SCHEDULE_MAX_SECONDS) {
      status(`a schedule's timing is a number of seconds in (0, ${SCHEDULE_MAX_SECONDS}]: nothing sent`, "error");
      return null;
    }
    return v;
  }

  // ---- the cards ----

  function buildDirections(keys) {
    el.directions.textContent = "";
    rows.clear();
    let index = 0;
    for (const group of groupDirections(keys)) {
      const section = document.createElement("div");
      section.className = "concept";
      section.dataset.concept = group.concept;
      const heading = document.createElement("h2");
      heading.textContent = group.title;
      const grid = document.createElement("div");
      grid.className = "dir-grid";
      section.append(heading, grid);
      el.directions.append(section);
      for (const key of group.keys) grid.append(buildCard(key, index++));
    }
  }

  function buildCard(key, index) {
    const root = document.createElement("div");
    root.className = "dir absent";
    root.dataset.key = key;
    const color = colorOf(index);
    root.style.setProperty("--dir-color", color);

    const head = document.createElement("div");
    head.className = "dir-head";
    const name = document.createElement("span");
    name.className = "dir-name";
    name.textContent = key;
    const activeLabel = document.createElement("label");
    activeLabel.className = "switch";
    activeLabel.title = "on / off";
    const active = document.createElement("input");
    active.type = "checkbox";
    active.className = "active";
    active.setAttribute("aria-label", `${key} on`);
    activeLabel.append(active, document.createElement("span"));
    head.append(name, activeLabel);

    const range = knobRange();
    const knob = document.createElement("input");
    knob.type = "range";
    knob.className = "knob";
    knob.min = String(-range);
    knob.max = String(range);
    knob.step = "0.01";
    knob.value = "0";
    knob.setAttribute("aria-label", `${key} coefficient`);

    const foot = document.createElement("div");
    foot.className = "dir-foot";
    const coef = document.createElement("input");  // the coefficient as is, and where to type one
    coef.type = "number";
    coef.className = "value coef";
    coef.step = "any";
    coef.value = "0";
    coef.title = "the coefficient: type a value and press Enter";
    coef.setAttribute("aria-label", `${key} coefficient value`);
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove";
    remove.textContent = "×";
    remove.title = "remove this direction from the state";
    foot.append(coef, remove);

    const timing = document.createElement("div");
    timing.className = "dir-timing";
    const schedule = document.createElement("select");
    schedule.className = "schedule";
    schedule.setAttribute("aria-label", `${key} schedule`);
    for (const kind of SCHEDULE_KINDS.concat(["keyframes"])) {
      const option = document.createElement("option");
      option.value = kind;
      option.textContent = kind.replace("_", " ");
      if (kind === "keyframes") option.disabled = true;  // shown when another client set keyframes
      schedule.append(option);
    }
    const secondsName = document.createElement("span");
    secondsName.className = "seconds-name small";
    const seconds = document.createElement("input");
    seconds.type = "number";
    seconds.className = "seconds";
    seconds.min = "0";
    seconds.max = String(SCHEDULE_MAX_SECONDS);
    seconds.step = "any";
    seconds.disabled = true;
    seconds.setAttribute("aria-label", `${key} schedule seconds`);
    const unit = document.createElement("span");
    unit.className = "small";
    unit.textContent = "s";
    timing.append(schedule, secondsName, seconds, unit);
    root.append(head, knob, foot, timing);

    const row = {root, knob, coef, active, schedule, seconds, secondsName, remove, color, index,
                 shown: 0, coefDirty: false, secondsDirty: false};
    rows.set(key, row);

    const inState = () => !!(dbg.state && dbg.state.directions && dbg.state.directions[key]);
    const sendCoefficient = (v) => ({type: "set", directions: {[key]: {coefficient: v}}});
    knob.addEventListener("pointerdown", () => { dragging = knob; });
    knob.addEventListener("input", () => {
      markTouched(knob);
      row.shown = Number(knob.value);
      row.coefDirty = false;
      coef.value = String(row.shown);
      throttledSend(`dir:${key}`, () => sendCoefficient(Number(knob.value)));
    });
    knob.addEventListener("change", () => { markTouched(knob); resyncSoon(); });  // the throttle sends the last value

    coef.addEventListener("input", () => { row.coefDirty = true; });
    coef.addEventListener("keydown", (event) => {
      if (event.key === "Escape") { row.coefDirty = false; applyState(); }
    });
    coef.addEventListener("change", () => {
      row.coefDirty = false;
      const v = Number(coef.value);
      if (coef.value.trim() === "" || !Number.isFinite(v)) {
        status(`${key}: the coefficient must be a number: nothing sent`, "error");
        applyState();
        return;
      }
      markTouched(coef);
      showCoefficient(row, v);  // the knob moves there now: touching it goes on from this value
      flushThrottle(`dir:${key}`);  // a knob change still waiting must not land after this one
      sendUi(sendCoefficient(v));
      resyncSoon();
    });

    active.addEventListener("change", () => {
      markTouched(active);
      const patch = {active: active.checked};
      if (!inState()) patch.coefficient = row.shown;
      sendUi({type: "set", directions: {[key]: patch}});
      resyncSoon();
    });

    const sendSchedule = (kind, secs) => {
      const patch = {schedule: scheduleFor(kind, secs)};
      if (!inState()) patch.coefficient = row.shown;
      sendUi({type: "set", directions: {[key]: patch}});
      resyncSoon();
    };
    schedule.addEventListener("change", () => {
      markTouched(schedule);
      const kind = schedule.value;
      const previous = SCHEDULE_TIMING[row.timingKind];
      const next = SCHEDULE_TIMING[kind];
      // The seconds carry over between kinds of the same timing (a fade-in's length to a fade-out's).
      let secs = next ? next.seconds : null;
      const typed = Number(seconds.value);
      if (next && previous && previous.name === next.name && seconds.value !== "" && typed > 0 &&
          typed <= SCHEDULE_MAX_SECONDS) secs = typed;
      showTiming(row, kind, secs);
      row.secondsDirty = false;
      sendSchedule(kind, secs);
    });
    seconds.addEventListener("input", () => { row.secondsDirty = true; });
    seconds.addEventListener("keydown", (event) => {
      if (event.key === "Escape") { row.secondsDirty = false; applyState(); }
    });
    seconds.addEventListener("change", () => {
      row.secondsDirty = false;
      const kind = schedule.value;
      const secs = SCHEDULE_TIMING[kind] ? validSeconds(seconds.value) : null;
      if (secs === null) { applyState(); return; }
      markTouched(seconds);
      sendSchedule(kind, secs);
    });

    remove.addEventListener("click", () => {
      if (inState()) sendUi({type: "set", directions: {[key]: null}});
    });
    return root;
  }

  // The coefficient as it is, in the number field and on the knob. A value beyond the knob's range (another
  // client's) is not clipped: the knob's range widens to hold it, so touching the knob goes on from it.
  function showCoefficient(row, c) {
    const range = knobRange();
    const reach = Math.max(range, Math.ceil(Math.abs(c) * 100) / 100);
    row.knob.min = String(-reach);
    row.knob.max = String(reach);
    row.knob.value = String(c);
    row.shown = c;
    const beyond = Math.abs(c) > range;
    row.root.classList.toggle("beyond", beyond);
    row.knob.title = beyond ? `beyond the knob's range ±${range}: the knob reaches ±${reach} while it is` : "";
    if (!row.coefDirty && !busy(row.coef)) row.coef.value = String(c);
  }

  // The schedule's timing field: its name and seconds, or disabled for kinds without one.
  function showTiming(row, kind, secs) {
    row.timingKind = kind;
    const timing = SCHEDULE_TIMING[kind];
    row.seconds.disabled = !timing;
    row.secondsName.textContent = timing ? timing.name : "";
    row.seconds.title = timing ? `${timing.name} in seconds (50 steps = 1 s)` : "this schedule has no timing to set";
    row.seconds.value = timing && secs !== null && Number.isFinite(secs) ? secondsText(secs) : "";
  }

  window.addEventListener("pointerup", () => {
    if (dragging) { markTouched(dragging); dragging = null; resyncSoon(); }
  });
  window.addEventListener("pointercancel", () => { dragging = null; resyncSoon(); });

  el.gate.addEventListener("pointerdown", () => { dragging = el.gate; });
  el.gate.addEventListener("input", () => {
    markTouched(el.gate);
    el.gateValue.textContent = Number(el.gate.value).toFixed(2);
    throttledSend("gate", () => ({type: "set", gate: {p: Number(el.gate.value)}}));
  });
  el.gate.addEventListener("change", () => { markTouched(el.gate); resyncSoon(); });

  let promptDirty = false;
  el.prompt.addEventListener("input", () => { promptDirty = true; });
  el.promptForm.addEventListener("submit", (event) => {
    event.preventDefault();
    if (sendUi({type: "set", prompt: el.prompt.value})) promptDirty = false;
  });

  el.play.addEventListener("click", () => {
    ensureAudio();
    const playback = dbg.state && dbg.state.playback;
    if (playback !== "playing") sendUi({type: "transport", command: "play"});
  });
  el.pause.addEventListener("click", () => sendUi({type: "transport", command: "pause"}));
  el.stop.addEventListener("click", () => sendUi({type: "transport", command: "stop"}));
  el.record.addEventListener("change", () => {
    markTouched(el.record);
    sendUi({type: "record", command: el.record.checked ? "start" : "stop"});
  });
  el.mute.addEventListener("change", () => { if (port) port.postMessage({type: "mute", value: el.mute.checked}); });

  // Show the echoed state (the source of truth) in every control the user is not holding.
  function applyState() {
    const state = dbg.state;
    if (!state) return;
    let skipped = false;
    const playback = state.playback || "stopped";
    el.playback.textContent = playback;
    el.playback.dataset.playback = playback;
    setStreaming(playback === "playing");

    if (!promptDirty) el.prompt.value = state.prompt || "";  // never overwrite text being edited

    const p = state.gate && typeof state.gate.p === "number" ? state.gate.p : 1;
    if (busy(el.gate)) skipped = true;
    else { el.gate.value = String(p); el.gateValue.textContent = p.toFixed(2); }

    const dirs = state.directions || {};
    for (const [key, row] of rows) {
      const d = dirs[key];
      row.root.classList.toggle("absent", !d);
      row.root.classList.toggle("inactive", !!d && d.active === false);
      // A draft typed in a number field is the user's until Enter / Escape (which show the state again).
      if (busy(row.knob) || busy(row.coef)) skipped = true;
      else showCoefficient(row, d ? d.coefficient : 0);
      if (busy(row.active)) skipped = true;
      else row.active.checked = !!d && d.active !== false;
      if (busy(row.schedule) || busy(row.seconds)) skipped = true;
      else if (!row.secondsDirty) {
        const kind = d && d.schedule ? d.schedule.kind : "constant";
        row.schedule.value = kind;
        showTiming(row, kind, d && d.schedule ? scheduleSeconds(d.schedule) : null);
      }
      row.schedule.title = d && d.schedule ? scheduleText(d.schedule) : "constant";
    }
    if (!busy(el.record)) el.record.checked = isRecording();
    if (skipped) resyncSoon();
  }

  function scheduleText(s) {
    const rest = Object.entries(s).filter(([k]) => k !== "kind").map(([k, v]) => `${k}=${JSON.stringify(v)}`);
    return rest.length ? `${s.kind}: ${rest.join(", ")} (absolute steps)` : s.kind;
  }

  // ---- status line -----------------------------------------------------------------------------------

  // The newest line first; the last few stay visible so a warning is not lost behind the next notice.
  function status(text, level) {
    const line = document.createElement("div");
    line.className = `status-line ${level || "info"}`;
    line.textContent = `${new Date().toLocaleTimeString()}  ${text}`;
    el.status.prepend(line);
    while (el.status.childElementCount > 3) el.status.lastElementChild.remove();
  }

  // ---- schedules and the plot ------------------------------------------------------------------------

  // phi(t) of a schedule object on the absolute step clock (engine/steering.py Schedule.__call__).
  function scheduleValue(schedule, t) {
    const s = {...SCHEDULE_DEFAULTS, ...(schedule || {kind: "constant"})};
    switch (s.kind) {
      case "constant": return 1;
      case "linear_rise": case "linear_decay": case "fade_in": case "fade_out": {
        const x = Math.min(Math.max((t - s.start) / s.length, 0), 1);
        const rising = s.kind === "linear_rise" || s.kind === "fade_in";
        if (s.kind.startsWith("linear") || s.curve === "linear" || x === 0 || x === 1) return rising ? x : 1 - x;
        return rising ? Math.sin(0.5 * Math.PI * x) : Math.cos(0.5 * Math.PI * x);
      }
      case "exp_decay": return Math.pow(s.lam, Math.max(t - s.start, 0));
      case "logistic": return 1 / (1 + Math.exp(-(t - s.center) / s.width));
      case "sine": return 0.5 * (1 + Math.sin(2 * Math.PI * t / s.period + s.phase));
      case "keyframes": {
        const pts = s.points || [];
        if (!pts.length) return 0;
        if (t <= pts[0][0]) return pts[0][1];
        for (let i = 1; i < pts.length; i++) {
          if (t < pts[i][0]) {
            const [s0, v0] = pts[i - 1];
            const [s1, v1] = pts[i];
            return v0 + (v1 - v0) * (t - s0) / (s1 - s0);
          }
        }
        return pts[pts.length - 1][1];
      }
      default: return 0;
    }
  }

  // The states in effect over the current epoch: [{step, state}] in step order.
  const timeline = [];
  let timelineEpoch = null;
  function remember(epoch, step, state) {
    if (epoch !== timelineEpoch) { timeline.length = 0; timelineEpoch = epoch; }
    const at = Math.max(0, step || 0);
    while (timeline.length && timeline[timeline.length - 1].step > at) timeline.pop();
    if (timeline.length && timeline[timeline.length - 1].step === at) timeline.pop();
    timeline.push({step: at, state});
    if (timeline.length > HISTORY_MAX) timeline.splice(0, timeline.length - HISTORY_MAX);
  }

  // The strength each active direction gets at step t: coefficient * schedule(t) * gate p.
  function strengths(state, t, out) {
    const p = state.gate && typeof state.gate.p === "number" ? state.gate.p : 1;
    const dirs = state.directions || {};
    for (const key in dirs) {
      const d = dirs[key];
      if (!d || d.active === false) continue;
      out.set(key, d.coefficient * scheduleValue(d.schedule, t) * p);
    }
    return out;
  }

  function hop() {
    const h = dbg.hello;
    if (h && h.hop) return h.hop;
    if (h && h.sample_rate && h.frame_rate) return h.sample_rate / h.frame_rate;
    return 640;
  }

  // The step now being heard: the worklet's play position, extrapolated between its reports.
  function playheadStep() {
    const pos = dbg.position;
    if (pos && pos.epoch === dbg.epoch && port) {
      let sample = pos.sample;
      if (streaming) sample += Math.min(0.25, (performance.now() - reportAt) / 1000) * pos.rate;
      return sample / hop();
    }
    const h = dbg.lastHeader;
    if (h && h.epoch === dbg.epoch) return (h.firstSample + h.numSamples) / hop();
    return dbg.step || 0;
  }

  function receivedStep() {
    const h = dbg.lastHeader;
    return h && h.epoch === dbg.epoch ? (h.firstSample + h.numSamples) / hop() : null;
  }

  // The plot's scale: the knob's range, widened to hold a coefficient set beyond it (shown as is, not clipped).
  function plotRange() {
    let range = knobRange();
    const dirs = (dbg.state && dbg.state.directions) || {};
    for (const key in dirs) {
      const c = dirs[key] && Number(dirs[key].coefficient);
      if (Number.isFinite(c)) range = Math.max(range, Math.abs(c));
    }
    return range;
  }

  function drawPlot() {
    const canvas = el.plot;
    const dpr = window.devicePixelRatio || 1;
    const cssW = canvas.clientWidth || 960;
    const cssH = canvas.clientHeight || 220;
    if (canvas.width !== Math.round(cssW * dpr) || canvas.height !== Math.round(cssH * dpr)) {
      canvas.width = Math.round(cssW * dpr);
      canvas.height = Math.round(cssH * dpr);
    }
    const g = canvas.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, cssW, cssH);
    const fps = frameRate();
    const past = PLOT_PAST_SECONDS * fps;
    const future = PLOT_FUTURE_SECONDS * fps;
    const head = playheadStep();
    const t0 = Math.max(0, head - past);
    const t1 = t0 + past + future;
    const left = 40, right = cssW - 8, top = 8, bottom = cssH - 20;
    const x = (t) => left + (t - t0) / (t1 - t0) * (right - left);
    const cmax = plotRange();
    const y = (v) => top + (1 - (v + cmax) / (2 * cmax)) * (bottom - top);

    // future region, grid, axes
    g.fillStyle = "rgba(255,255,255,0.035)";
    g.fillRect(x(head), top, right - x(head), bottom - top);
    g.strokeStyle = "rgba(255,255,255,0.12)";
    g.lineWidth = 1;
    g.font = "11px system-ui, sans-serif";
    g.fillStyle = "rgba(255,255,255,0.55)";
    g.textAlign = "center";
    for (let sec = Math.ceil(t0 / fps); sec * fps <= t1; sec++) {
      const xs = x(sec * fps);
      g.beginPath(); g.moveTo(xs, top); g.lineTo(xs, bottom); g.stroke();
      if (sec % 2 === 0) g.fillText(`${sec}s`, xs, cssH - 5);
    }
    g.textAlign = "right";
    for (const v of [-cmax, -cmax / 2, 0, cmax / 2, cmax]) {
      g.strokeStyle = v === 0 ? "rgba(255,255,255,0.35)" : "rgba(255,255,255,0.12)";
      g.beginPath(); g.moveTo(left, y(v)); g.lineTo(right, y(v)); g.stroke();
      g.fillText(String(Number(v.toFixed(1))), left - 4, y(v) + 4);
    }

    // one line per direction, each step's strength from the state in effect at that step
    const legend = new Set();
    if (timeline.length) {
      const series = new Map();
      const px = Math.max(1, Math.floor(right - left));
      let hi = 0;
      const current = new Map();
      for (let i = 0; i <= px; i++) {
        const t = t0 + (t1 - t0) * i / px;
        while (hi + 1 < timeline.length && timeline[hi + 1].step <= t) hi++;
        current.clear();
        strengths(timeline[hi].state, t, current);
        for (const [key, v] of current) {
          if (!series.has(key)) series.set(key, new Array(px + 1).fill(null));
          series.get(key)[i] = v;
        }
      }
      g.lineWidth = 2;
      for (const [key, values] of series) {
        const row = rows.get(key);
        g.strokeStyle = row ? row.color : "#ccc";
        g.beginPath();
        let pen = false;
        values.forEach((v, i) => {
          if (v === null) { pen = false; return; }
          const xs = left + i, ys = y(Math.max(-cmax, Math.min(cmax, v)));
          if (pen) g.lineTo(xs, ys); else g.moveTo(xs, ys);
          pen = true;
        });
        g.stroke();
        legend.add(key);
      }
    }

    // the generated-audio head (dashed) and the playhead
    const rec = receivedStep();
    if (rec !== null && rec >= t0 && rec <= t1) {
      g.setLineDash([4, 4]);
      g.strokeStyle = "rgba(255,255,255,0.4)";
      g.beginPath(); g.moveTo(x(rec), top); g.lineTo(x(rec), bottom); g.stroke();
      g.setLineDash([]);
    }
    g.strokeStyle = "#ffd166";
    g.lineWidth = 1.5;
    g.beginPath(); g.moveTo(x(head), top); g.lineTo(x(head), bottom); g.stroke();
    g.textAlign = "left";
    g.fillStyle = "#ffd166";
    g.fillText(`step ${Math.floor(head)}`, Math.min(x(head) + 4, right - 60), top + 12);

    const text = [...legend].join(",");
    if (text !== el.legend.dataset.keys) {
      el.legend.dataset.keys = text;
      el.legend.textContent = "";
      if (!legend.size) el.legend.textContent = "strength = coefficient × schedule × gate p; no active direction";
      for (const key of legend) {
        const item = document.createElement("span");
        item.className = "legend-item";
        item.style.setProperty("--dir-color", rows.get(key) ? rows.get(key).color : "#ccc");
        item.textContent = key;
        el.legend.append(item);
      }
    }
  }

  function frame() {
    try { drawPlot(); } catch (e) { status(`plot: ${e}`, "error"); }
    if (port && performance.now() - reportAt > 1000) drawMeter(0, 0);
    requestAnimationFrame(frame);
  }

  // Exposed for tests of the schedule maths and of the directions' order.
  dbg.scheduleValue = scheduleValue;
  dbg.groupDirections = groupDirections;

  connect();
  requestAnimationFrame(frame);
})();
