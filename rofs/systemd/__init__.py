"""systemd units shipped with rofs (see docs/readonly-root.md)."""
