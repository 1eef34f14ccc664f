"""Container health check: the gateway answers /ready with 200 (model, reward and an engine or
an upstream are usable). Standard library only; sends VBON_API_KEY if one is set."""

import os
import sys
import urllib.request

port = os.environ.get("VBON_PORT", "8000")
req = urllib.request.Request(f"http://127.0.0.1:{port}/ready")
if os.environ.get("VBON_API_KEY"):
    req.add_header("Authorization", f"Bearer {os.environ['VBON_API_KEY']}")
try:
    with urllib.request.urlopen(req, timeout=4) as resp:
        sys.exit(0 if resp.status == 200 else 1)
except Exception as exc:  # noqa: BLE001 - any failure means unhealthy
    print(f"not ready: {exc}", file=sys.stderr)
    sys.exit(1)
