"""Clients of a live `musicrfm serve` session (docs/protocol.md). They import nothing but
`musicrfm.protocol` (the wire format and the one client connection), never the server or the engine.

  listen   `musicrfm listen`: a session through the speakers (jitter buffer, resampler, PortAudio)
  perform  `musicrfm perform --url`: a score played on a running server
  web/     the browser page (knobs, schedules, meter), served by the server as files
"""
