"""Clients of a live `musicrfm serve` session (docs/protocol.md): `listen` plays a session through the
speakers; the browser page lives in `clients/web/`. Clients import nothing from `server/` but
`server.protocol`, the wire format."""
