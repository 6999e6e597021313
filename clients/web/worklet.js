// musicrfm playback: a ring buffer of the stream's PCM, played at the AudioContext's rate.
//
// The main thread posts {type: "pcm", pcm: Float32Array, rate, firstSample, epoch} (the buffer
// transferred). The ring holds samples at the stream's own rate; each output sample reads the ring at a
// fractional position (linear interpolation), advancing by streamRate / contextRate per output sample.
// When the ring runs dry while the stream is playing the output is silence and an underrun is counted;
// playback then waits for PREROLL_SECONDS of audio before it starts again, so a late chunk does not
// turn into a stutter of single render quanta.
//
// Reports {type: "report", samplesPlayed, underruns, overruns, buffered, rms, peak, position, epoch}
// about every REPORT_SECONDS: samplesPlayed counts stream samples consumed, position is the stream
// sample index now being played (null before any audio), rms / peak describe the output since the last
// report.

const RING_SECONDS = 4;
const PREROLL_SECONDS = 0.1;
const REPORT_SECONDS = 0.1;

class MusicrfmPlayer extends AudioWorkletProcessor {
  constructor() {
    super();
    this.streamRate = 32000;
    this.allocate(this.streamRate);
    this.streaming = false;   // the server says the stream is playing: running dry is an underrun
    this.primed = false;      // enough audio buffered to (re)start output
    this.muted = false;
    this.samplesPlayed = 0;
    this.underruns = 0;
    this.overruns = 0;
    this.inUnderrun = false;
    this.markers = [];        // [{at: ring total index, firstSample, epoch}] where a chunk starts
    this.sumSquares = 0;
    this.peak = 0;
    this.meterCount = 0;
    this.sinceReport = 0;
    this.port.onmessage = (event) => this.onMessage(event.data);
  }

  allocate(rate) {
    // Capacity: RING_SECONDS at the larger of the stream's and the context's rate.
    this.capacity = Math.ceil(RING_SECONDS * Math.max(rate, sampleRate));
    this.ring = new Float32Array(this.capacity);
    this.written = 0;         // total samples ever written (ring index = total % capacity)
    this.readPos = 0;         // fractional total read position
    this.markers = [];
    this.primed = false;
  }

  onMessage(msg) {
    if (msg.type === "pcm") {
      this.push(msg);
    } else if (msg.type === "streaming") {
      this.streaming = !!msg.value;
      if (!this.streaming) this.inUnderrun = false;
    } else if (msg.type === "mute") {
      this.muted = !!msg.value;
    } else if (msg.type === "flush") {
      this.allocate(this.streamRate);
    }
  }

  push(msg) {
    const pcm = msg.pcm;
    if (msg.rate !== this.streamRate) {
      this.streamRate = msg.rate;
      this.allocate(msg.rate);
    }
    const last = this.markers[this.markers.length - 1];
    const contiguous = last && last.epoch === msg.epoch &&
      last.firstSample + (this.written - last.at) === msg.firstSample;
    if (!contiguous) this.markers.push({at: this.written, firstSample: msg.firstSample, epoch: msg.epoch});
    let n = pcm.length;
    let src = 0;
    if (n > this.capacity) { src = n - this.capacity; n = this.capacity; }
    for (let i = 0; i < n; i++) this.ring[(this.written + i) % this.capacity] = pcm[src + i];
    this.written += n;
    const oldest = this.written - this.capacity;
    if (this.readPos < oldest) {   // the writer lapped the reader: drop the oldest audio
      this.readPos = oldest;
      this.overruns++;
    }
    while (this.markers.length > 1 && this.markers[1].at <= this.readPos) this.markers.shift();
  }

  buffered() {
    return Math.max(0, this.written - 1 - this.readPos);
  }

  position() {
    let marker = null;
    for (const m of this.markers) if (m.at <= this.readPos) marker = m;
    if (!marker) return null;
    return {position: marker.firstSample + Math.floor(this.readPos - marker.at), epoch: marker.epoch};
  }

  process(inputs, outputs) {
    const out = outputs[0];
    const left = out[0];
    const frames = left.length;
    const step = this.streamRate / sampleRate;
    if (!this.primed) {
      // Start when PREROLL_SECONDS are there, or at once with whatever is left when the stream ended.
      const need = this.streaming ? PREROLL_SECONDS * this.streamRate : 1;
      if (this.buffered() >= need) { this.primed = true; this.inUnderrun = false; }
    }
    let played = 0;
    for (let i = 0; i < frames; i++) {
      let value = 0;
      if (this.primed) {
        const base = Math.floor(this.readPos);
        if (base + 1 < this.written) {
          const frac = this.readPos - base;
          const a = this.ring[base % this.capacity];
          const b = this.ring[(base + 1) % this.capacity];
          value = a + (b - a) * frac;
          const before = base;
          this.readPos += step;
          played += Math.floor(this.readPos) - before;
        } else {
          this.primed = false;
          if (this.streaming && !this.inUnderrun) { this.underruns++; this.inUnderrun = true; }
        }
      }
      if (this.muted) value = 0;
      left[i] = value;
      this.sumSquares += value * value;
      const mag = Math.abs(value);
      if (mag > this.peak) this.peak = mag;
    }
    for (let c = 1; c < out.length; c++) out[c].set(left);
    this.samplesPlayed += played;
    while (this.markers.length > 1 && this.markers[1].at <= this.readPos) this.markers.shift();
    this.meterCount += frames;
    this.sinceReport += frames;
    if (this.sinceReport >= REPORT_SECONDS * sampleRate) {
      const pos = this.position();
      this.port.postMessage({
        type: "report",
        samplesPlayed: this.samplesPlayed,
        underruns: this.underruns,
        overruns: this.overruns,
        buffered: this.buffered() / this.streamRate,
        rms: Math.sqrt(this.sumSquares / Math.max(1, this.meterCount)),
        peak: this.peak,
        position: pos ? pos.position : null,
        epoch: pos ? pos.epoch : null,
        contextRate: sampleRate,
        streamRate: this.streamRate,
      });
      this.sumSquares = 0;
      this.peak = 0;
      this.meterCount = 0;
      this.sinceReport = 0;
    }
    return true;
  }
}

registerProcessor("musicrfm-player", MusicrfmPlayer);
