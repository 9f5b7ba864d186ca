"""Keep README's settings table equal to the code (``python -m cbmflow.dev.readme_sync``)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from cbmflow.settings import settings_table

README = Path(__file__).resolve().parents[2] / "README.md"
BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"


def render() -> str:
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    lines += [f"| `{env}` | `{default}` | {desc} |" for env, default, desc in settings_table()]
    return "\n".join(lines)


def synced(text: str) -> str:
    return re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), f"{BEGIN}\n{render()}\n{END}", text, flags=re.DOTALL)


if __name__ == "__main__":
    text = README.read_text()
    new = synced(text)
    if "--check" in sys.argv:
        sys.exit(0 if new == text else 1)
    README.write_text(new)
