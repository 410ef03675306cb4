"""Writing benchmark results: JSON after every row, markdown at the end."""

from __future__ import annotations

import json


def save_json(path, device: str, date: str, rows: list) -> None:
    if path:
        with open(path, "w") as f:
            json.dump({"device": device, "date": date, "rows": rows}, f, indent=1)


def finish(md: str, path) -> int:
    print(md)
    if path:
        with open(path, "w") as f:
            f.write(md)
    return 0
