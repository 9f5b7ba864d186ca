"""The JSON response every route and every error answers with."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse


class ApiJSONResponse(JSONResponse):
    """JSON that keeps non-ASCII parcel ids and crop names readable."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
