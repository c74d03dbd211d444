"""What the benchmark scripts share at their end: print the table and write the JSON record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def finish(record: dict[str, Any], table: str, out: Path) -> None:
    """Print ``table`` and the total time, add the table to ``record`` and write it to ``out`` as JSON (numpy
    scalars as numbers, anything else unknown as text)."""
    print(table)
    print(f"total {record['total_s']} s")
    record["table"] = table
    out.write_text(json.dumps(record, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
    print(f"wrote {out}")
