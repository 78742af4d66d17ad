"""segpipe's Prefect flows. Importing the package sets offline, quiet defaults first."""

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Offline, quiet defaults. Set before prefect is imported because prefect reads its settings
# once, at import; setdefault so that an environment (tests, a real server) can override them.
for _key, _value in {
    "PREFECT_HOME": str(PROJECT_ROOT / ".prefect"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    # The temporary local server takes 4-11 s to start, more on a loaded machine.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "DVC_NO_ANALYTICS": "1",
}.items():
    os.environ.setdefault(_key, _value)
