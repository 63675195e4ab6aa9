from rofs.cli import entry

raise SystemExit(entry())
