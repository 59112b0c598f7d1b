"""What every benchmark document says about the machine it ran on."""

from __future__ import annotations

import os
import platform
from typing import Any


def machine(**extra: Any) -> dict[str, Any]:
    """Cores, platform and Python version, then ``extra`` (a driver version, the load)."""
    return {
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **extra,
    }
