"""musicrfm protocol: what server and clients share, and nothing that needs torch (docs/protocol.md).

  wire        WebSocket messages and binary audio frames, limits, ProtocolError
  connection  the one client connection: URL, hello, send, receive, close, clear errors for failing to join
  score       the performance score format (TOML cues -> `set` messages)
  wav         WAV files: the one writer (whole or streaming, 16-bit PCM mono) and the readers
"""
