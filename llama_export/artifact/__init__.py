"""The artifact contract that export writes and backends and the runner read: the custom-node and
graph I/O schema (`schema.py`) and the export directory's `manifest.json` (`manifest.py`)."""
