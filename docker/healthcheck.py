"""The images' HEALTHCHECK: exit 0 if GET http://127.0.0.1:PORT/PATH answers 200, else 1.

    python docker/healthcheck.py [PORT] [PATH]   defaults: $AGENTFLEET_METRICS_PORT (9464), /healthz

The standard library only: the images need neither curl nor wget.
"""

import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    port = argv[1] if len(argv) > 1 else os.environ.get("AGENTFLEET_METRICS_PORT", "9464")
    path = argv[2] if len(argv) > 2 else "/healthz"
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            ok = resp.status == 200
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
