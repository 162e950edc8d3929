"""One JSON POST with a deadline, for the webhook channels. The URL may be a secret (a Slack
webhook's path is its token): errors name only its scheme and host."""

from __future__ import annotations

import urllib.error
import urllib.request
from urllib.parse import urlsplit

from activities.notify.event import DeliveryFailed


def post_json(url: str, body: bytes, timeout: float, what: str) -> bytes:
    u = urlsplit(url)
    where = f"{what} at {u.scheme}://{u.hostname}" + (f":{u.port}" if u.port else "")
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json", "User-Agent": "eagle-dr"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - http(s) checked by the config
            return resp.read()
    except urllib.error.HTTPError as e:
        raise DeliveryFailed(f"{where}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise DeliveryFailed(f"{where}: {e.reason}") from None
    except (OSError, TimeoutError) as e:
        raise DeliveryFailed(f"{where}: {type(e).__name__}: {e}") from None
