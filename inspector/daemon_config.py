"""The ``daemon:`` section of a camera config (systemd integration, see :mod:`inspector.daemon`).

Kept apart from :mod:`inspector.daemon` so that :mod:`inspector.config` can embed it without
importing the pipeline (which imports the config).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class DaemonConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    watchdog_stall_s: float = Field(
        20.0, gt=0,
        description="WATCHDOG=1 pings stop once no frame came through the pipeline (published, or "
                    "refused by a full subscriber queue) for this long, so systemd "
                    "restarts a stuck pipeline (WatchdogSec= in the unit is the grace after that)")
    watchdog_while_reopening: bool = Field(
        True,
        description="keep pinging while the camera is down and the reopen loop is still trying: "
                    "a restart would not bring a missing camera back, the reopen loop will")
    stop_timeout_s: float = Field(
        20.0, gt=0,
        description="on SIGTERM, longest wait for queued frames to be published; the PLC drivers' "
                    "last write and the threads then get at most 5 s more: keep it at least 5 s "
                    "below the unit's TimeoutStopSec (30 s)")
