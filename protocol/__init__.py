"""musicrfm protocol: what server and clients share, and nothing that needs torch (docs/protocol.md).

  wire   WebSocket messages and binary audio frames, limits, ProtocolError
  score  the performance score format (TOML cues -> `set` messages)
"""
