"""Log levels of the libraries the runtime drives.

The PLC libraries log at INFO for every request (asyncua: each heartbeat write and acknowledge
read, about 3 lines a second; its server: a thousand lines at start), and snap7 and pymodbus log
each reconnect attempt. Under systemd that is a quarter of a million journal lines a day per
camera, burying the inspector's own one line per state change. The drivers report every failure
themselves (one line per outage, one when the PLC is back), so the libraries are held at WARNING
(pymodbus, which repeats the driver's connection errors at ERROR, at CRITICAL) unless the log
level is DEBUG, where their detail is what a commissioning engineer asked for.

OpenCV logs past Python's logging, straight to stderr: a replay image gone missing printed its
``findDecoder imread_(...): can't open/read file`` warning for every frame (105 lines in 35 s)
beside the inspector's one line per burst of dropped frames. It is held at ERROR likewise.
"""

from __future__ import annotations

import logging

#: library logger -> the level it is held at below DEBUG
LIBRARY_LEVELS = {"asyncua": logging.WARNING, "snap7": logging.WARNING, "pymodbus": logging.CRITICAL}


def quiet_libraries(level: int) -> None:
    """Hold the PLC libraries' loggers at :data:`LIBRARY_LEVELS` unless ``level`` is DEBUG; a
    stricter ``level`` (ERROR) holds them there too: a level set on a logger is not filtered
    again by the root's, so held at WARNING they would speak where the root was told not to."""
    for name, held in LIBRARY_LEVELS.items():
        logging.getLogger(name).setLevel(logging.NOTSET if level <= logging.DEBUG else max(held, level))
    _quiet_opencv(level)


def _quiet_opencv(level: int) -> None:
    """OpenCV's own log (not Python's logging) at ERROR, at its default WARNING under DEBUG. What
    it warns of in the runtime's calls reaches the inspector anyway, as a return value (``imread``
    gives None) or an exception, and is reported there, once per burst."""
    # imported now, not only if already loaded: the replay source imports it after this ran
    import cv2

    lv = cv2.utils.logging
    lv.setLogLevel(lv.LOG_LEVEL_WARNING if level <= logging.DEBUG else lv.LOG_LEVEL_ERROR)


def set_level(level: str | int) -> None:
    """The root logger's level (a name such as ``"INFO"``, or a number), the libraries' with it."""
    root = logging.getLogger()
    root.setLevel(level)
    quiet_libraries(root.level)
