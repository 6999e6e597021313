"""musicrfm server: live sessions (control state, streams, pacing), WebSocket + OSC transports, recordings."""
