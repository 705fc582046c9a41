"""Can the Hugging Face hub be reached right now? A quick check that honours HF_HUB_OFFLINE."""

from __future__ import annotations

import os
import urllib.error
import urllib.request

_TRUE = {"1", "true", "yes", "on"}


def hub_status(timeout: float = 3.0) -> tuple[bool, str]:
    """(reachable, reason): one HEAD request to the hub endpoint, bounded by ``timeout`` seconds.

    ``HF_HUB_OFFLINE`` set to a true value means unreachable without any network access.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return False, "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True, f"{endpoint} answered"  # the server is there; an error status still means reachable
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"{endpoint} cannot be reached ({reason})"
    return True, f"{endpoint} answered"
