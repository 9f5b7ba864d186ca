"""A static file server on 127.0.0.1 with HTTP Range requests, for GDAL ``/vsicurl/`` in tests.

Run as a subprocess (``python tests/range_http.py DIR``; it prints its port): GDAL may hold the
GIL while it reads through curl, so a server thread inside the test process could deadlock, and
the standard library's handler ignores ``Range`` (GDAL reads COGs by ranges).
"""

from __future__ import annotations

import functools
import http.server
import io
import os
import re
import sys
from typing import Any


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    def send_head(self) -> Any:
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", (self.headers.get("Range") or "").strip())
        path = self.translate_path(self.path)
        if wanted is None or os.path.isdir(path):
            return super().send_head()
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                start = int(wanted.group(1))
                end = min(int(wanted.group(2)) if wanted.group(2) else size - 1, size - 1)
                if start >= size:
                    self.send_error(416)
                    return None
                fh.seek(start)
                data = fh.read(end - start + 1)
        except OSError:
            self.send_error(404)
            return None
        self.send_response(206)
        self.send_header("Content-Type", self.guess_type(path))
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        return io.BytesIO(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        pass


def main() -> None:
    handler = functools.partial(RangeHandler, directory=sys.argv[1])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
