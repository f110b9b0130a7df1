"""GenICam cameras through harvesters and any GenTL producer (.cti).

The source owns one ``Harvester`` and one ``ImageAcquirer`` between ``open()`` and ``close()``.
Each ``read()`` fetches one buffer, copies the image out (the buffer goes back to the producer's
queue as soon as the ``with`` block ends) and wraps it in a :class:`~inspector.frame.Frame`.

Example (the simulated ``viky`` camera shipped in the ``genicam`` wheel)::

    from inspector.sources.genicam import GenicamConfig, GenicamSource, default_viky_cti
    cfg = GenicamConfig(cti=str(default_viky_cti()), serial="0", pixel_format="Mono8",
                        width=320, height=240, fps=50, frames=10)
    with GenicamSource(cfg, camera_id="cam1") as src:
        for frame in src:          # frame.image: 240x320 uint8
            ...

harvesters and genicam are imported inside ``open()`` so that importing ``inspector`` (and this
module, for its config) stays cheap on machines that only replay recordings.
"""

from __future__ import annotations

import importlib.util
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from inspector.errors import FrameError, SourceConfigError, SourceError, first_line
from inspector.frame import Frame
from inspector.sources.base import Source

log = logging.getLogger(__name__)

#: a device frame id that jumps further between two buffers is no frame count (83 min of frames at
#: 200 fps; a stall that long ends in a reopen, which starts a new baseline)
MAX_DEVICE_ID_JUMP = 1_000_000

# PixelFormat -> (bytes per pixel in the buffer, OpenCV conversion to RGB or None for a plain copy).
# cvtColor writes straight into the frame's array and is ~50x faster than numpy's strided copy
# for dropping alpha or swapping channels (0.06 ms vs 4 ms at 800x800).
_LAYOUTS: dict[str, tuple[int, int | None]] = {
    "Mono8": (1, None),
    "RGB8": (3, None),
    "BGR8": (3, cv2.COLOR_BGR2RGB),
    "RGBa8": (4, cv2.COLOR_RGBA2RGB),
    "BGRa8": (4, cv2.COLOR_BGRA2RGB),
}
SUPPORTED_PIXEL_FORMATS = tuple(_LAYOUTS)

#: ``cti: builtin:viky`` names the simulated camera shipped inside the genicam wheel
BUILTIN_PREFIX = "builtin:"
BUILTIN_VIKY = "builtin:viky"
BUILTIN_PRODUCERS = (BUILTIN_VIKY,)


class GenicamConfig(BaseModel):
    """Settings of a GenICam camera (``source.type: genicam``).

    ``width``/``height``/``fps`` left at ``None`` keep whatever the camera currently has; the
    offsets are only written when the camera has ``OffsetX``/``OffsetY`` or when they are non-zero
    (and, where the camera has them, set to 0 before the size is written: see ``_configure``).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # fps: .inf passed ge=0

    type: Literal["genicam"] = "genicam"
    cti: str = Field(..., description="path to the GenTL producer (.cti), relative to the config file; "
                                      "'builtin:viky' = the simulated camera in the genicam wheel")
    serial: str | None = Field(None, description="pick the device by serial number")
    device_id: str | None = Field(None, description="pick the device by GenTL id")
    index: int | None = Field(None, ge=0, description="pick the device by position in the list")
    pixel_format: str = Field("Mono8", description="GenICam PixelFormat, e.g. Mono8, RGBa8")
    width: int | None = Field(None, ge=1)
    height: int | None = Field(None, ge=1)
    offset_x: int = Field(0, ge=0)
    offset_y: int = Field(0, ge=0)
    fps: float | None = Field(None, gt=0, description="AcquisitionFrameRate; None = camera default")
    fetch_timeout_s: float = Field(2.0, gt=0)
    timestamp: Literal["device", "host"] = Field(
        "host",
        description="t_capture_ns from the host clock at fetch ('host', default: end-to-end latency "
                    "is then measured on one clock), or the buffer timestamp where the device gives "
                    "one ('device'; only when the camera clock is PTP-synchronised to the host's "
                    "epoch clock). The device timestamp is always in meta['device_timestamp_ns'].",
    )
    mm_per_px_across: float | None = Field(None, gt=0)
    mm_per_px_along: float | None = Field(None, gt=0)
    frames: int | None = Field(None, ge=1, description="stop after this many frames; None = endless")

    @field_validator("cti")
    @classmethod
    def _known_builtin(cls, value: str) -> str:
        # "builtin:" is this program's prefix, not a path: a typo in the name would otherwise be
        # looked for as a file called "builtin:foo" beside the config
        if value.startswith(BUILTIN_PREFIX) and value not in BUILTIN_PRODUCERS:
            name = value[len(BUILTIN_PREFIX):]
            known = ", ".join(b[len(BUILTIN_PREFIX):] for b in BUILTIN_PRODUCERS)
            raise ValueError(f"unknown built-in producer {name!r} (known: {known}); or give the "
                             "path of the camera vendor's .cti file")
        return value

    @field_validator("serial", "device_id", mode="before")
    @classmethod
    def _number_as_text(cls, value: Any, info: ValidationInfo) -> Any:
        # `serial: 12345678` unquoted is how most people write it, and YAML hands over an int.
        # Its decimal text is the serial whenever it was written in plain decimal without a
        # leading zero, which is what serials printed on cameras look like, so it is accepted.
        # What the int cannot tell: YAML 1.1 reads 0-prefixed digits as octal (012 -> 10),
        # 0x.. as hex and drops underscores, so such a serial comes out as another number. That
        # is not refused here (the text is gone); a serial of digits that matches no device
        # says to quote it (see _pick_device). A bool (`yes`, `on`) or a float has no sensible
        # text at all: refused with the same advice.
        if isinstance(value, (bool, float)):
            raise ValueError(f"YAML read this as {type(value).__name__} {value!r}, not text: quote "
                             f'it ({info.field_name}: "...")')
        return str(value) if isinstance(value, int) else value

    @field_validator("pixel_format")
    @classmethod
    def _convertible_format(cls, value: str) -> str:
        # Only formats read() can turn into uint8 mono/RGB; anything else would open fine and
        # then drop every frame, so refuse it when the config is loaded.
        if value not in _LAYOUTS:
            raise ValueError(f"{value!r} is not supported; use one of {', '.join(SUPPORTED_PIXEL_FORMATS)}")
        return value

    @model_validator(mode="after")
    def _one_way_to_pick(self) -> "GenicamConfig":
        # An index together with a serial or id is ambiguous (index into what?); refuse it at load
        # time rather than guessing which one the operator meant.
        if self.index is not None and (self.serial is not None or self.device_id is not None):
            raise ValueError("give source.index or source.serial/source.device_id, not both")
        return self


def default_viky_cti() -> Path | None:
    """Path of the simulated ``viky.cti`` camera shipped inside the ``genicam`` wheel, if present.

    Found without importing ``genicam`` (which loads its shared libraries), so tests and docs can
    ask cheaply whether a simulated camera is available.
    """
    spec = importlib.util.find_spec("genicam")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "viky.cti"
    return path if path.is_file() else None


def _safe_attr(obj: Any, name: str) -> Any:
    """An attribute of a GenTL object, or None: producers raise (not return None) for missing info."""
    try:
        return getattr(obj, name)
    except Exception:  # GenTL NotAvailable/NotImplemented, AttributeError, ...
        return None


def _device_label(info: Any) -> str:
    """``model serial=.. id=..`` for one GenTL device info, for logs and error messages."""
    model = _safe_attr(info, "model") or "?"
    return f"{model} serial={_safe_attr(info, 'serial_number')!r} id={_safe_attr(info, 'id_')!r}"


#: GenApi's answers that mean "not this value", whatever the camera's state (out of its range, not
#: one of its enum entries), as against a node that is locked or busy for now
_VALUE_REFUSALS = ("OutOfRangeException", "InvalidArgumentException")


class GenicamSource(Source):
    """Frames from one GenICam camera (see module docs).

    Frame ids are this source's own counter: they start at 0 and keep rising across a close and
    reopen, so a subscriber never sees one id twice from one daemon. Every fetched buffer takes an
    id, broken ones included. The camera's own frame id goes into
    ``frame.meta["device_frame_id"]``.

    The strip position follows the camera's frame id, not ours: frames the camera or its producer
    dropped before we fetched them (the consumer stalled, the producer's buffers ran out) make its
    id jump, and the strip moved on under them. ``frame.meta["strip_frame_index"]`` is the frame's
    place along the strip in frame lengths, ``strip_pos_mm`` that times rows x
    ``mm_per_px_along``, and ``frame.meta["camera_skipped"]`` the frames lost right before this
    one (the pipeline counts them). Each open starts a new baseline, since a camera may restart
    its counter: the first frame after a reopen is placed right after the last one before it
    (how far the strip moved during the outage is unknown without an encoder). Where the device
    id is missing or does not increase, that frame advances one frame length, as if none was
    lost, and a warning says so once.
    """

    def __init__(self, cfg: GenicamConfig, camera_id: str, base_dir: Path | None = None,
                 config_file: str = "<memory>"):
        self.cfg = cfg
        self.camera_id = camera_id
        self.base_dir = base_dir
        self.config_file = config_file
        self._harvester: Any = None
        self._ia: Any = None
        self._streaming = False  # prepared (acquirer made, nodes written) is not yet started
        self._next_id = 0
        self._strip_index = -1  # strip_frame_index of the last fetched buffer
        self._last_device_id: int | None = None  # baseline for the next delta; None right after open
        self._skipped_pending = 0  # lost before a broken buffer: reported with the next frame
        self._warned_device_id = False
        # Held while a buffer is out of the producer, so that close() from another thread (daemon
        # shutdown) never destroys the acquirer under a fetch: with viky that race leaves the
        # producer unusable for the rest of the process (no devices listed on the next open).
        self._lock = threading.Lock()
        self._closing = False  # lets close() in, even though the grab loop re-takes the lock at once
        self._label = f"genicam camera {camera_id}"
        self._timeout_exc: type[BaseException] = TimeoutError
        self._lost_excs: tuple[type[BaseException], ...] = ()
        self._gentl_excs: tuple[type[BaseException], ...] = ()
        self._not_available_excs: tuple[type[BaseException], ...] = (AttributeError,)

    # -- opening ---------------------------------------------------------------------------------

    def cti_path(self) -> Path:
        """``cfg.cti`` resolved against ``base_dir`` (the config file's folder)."""
        if self.cfg.cti == BUILTIN_VIKY:
            return default_viky_cti() or Path("viky.cti (not found in the genicam package)")
        path = Path(self.cfg.cti).expanduser()
        if not path.is_absolute() and self.base_dir is not None:
            path = Path(self.base_dir) / path
        return path

    def open(self) -> None:
        """Load the producer, pick the device, write the configured nodes (:meth:`prepare`, if
        not done yet) and start streaming.

        Any failure releases what was already acquired, so a failed open leaves no device locked.
        """
        self.prepare()
        if self._streaming:
            return
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        self._streaming = True
        log.info("opened %s", self.describe())

    def prepare(self) -> None:
        """Load the producer, pick the device and write the configured nodes, not streaming yet:
        a value the camera refuses is known before the model warms up. A failure releases what
        was already acquired."""
        if self._ia is not None:
            return
        # A reopened (or power-cycled) camera may count from scratch: no delta across an open.
        self._last_device_id = None
        cti = self.cti_path()
        if not cti.is_file():
            raise SourceError(f"GenTL producer not found: {cti} (source.cti); install the camera "
                              "vendor's GenTL producer or fix the path")
        from genicam import genapi, gentl
        from harvesters.core import Harvester

        self._timeout_exc = gentl.TimeoutException
        self._not_available_excs = (gentl.GenericException, AttributeError)
        # After a device loss harvesters surfaces GenTL errors, or IndexError/AttributeError from
        # its own bookkeeping once the acquirer was destroyed underneath it.
        self._gentl_excs = (gentl.GenericException, genapi.GenericException)
        self._lost_excs = (*self._gentl_excs, IndexError, AttributeError)
        try:
            self._harvester = Harvester()
            self._load_producer(cti)
            index = self._pick_device(cti)
            self._label = f"{_device_label(self._harvester.device_info_list[index])} ({self.camera_id})"
            self._ia = self._create_acquirer(index)
            self._configure(self._node_map(), genapi.GenericException)
        except BaseException:
            self.close()
            raise

    def _load_producer(self, cti: Path) -> None:
        _check_producer(cti, self.config_file)
        try:
            # validity checked above: harvesters' own check logs a traceback before raising
            self._harvester.add_file(str(cti), check_existence=True, check_validity=False)
        except OSError as e:  # the file went away since
            raise SourceError(f"cannot load GenTL producer {cti} (source.cti): {e}") from e
        try:
            self._harvester.update()
        except Exception as e:
            raise SourceError(f"GenTL producer {cti} (source.cti) failed to list devices: "
                              f"{first_line(e)}") from e

    def _pick_device(self, cti: Path) -> int:
        """Index of the configured device in the producer's list; the error lists what exists."""
        infos = list(self._harvester.device_info_list)
        if not infos:
            raise SourceError(f"{self.config_file}: source.cti: the GenTL producer {cti} lists no "
                              "devices: no camera connected (or not powered, or on another network)")
        available = "; ".join(f"[{i}] {_device_label(d)}" for i, d in enumerate(infos))
        c = self.cfg
        if c.serial is None and c.device_id is None:
            index = c.index or 0
            if index >= len(infos):
                # a wrong number, or on a line of several cameras one still booting: a restart
                # finds it then, so exit 1 (restarted) like a serial that matches nothing
                raise SourceError(f"{self.config_file}: source.index: no device at "
                                  f"source.index={index} (the producer lists {len(infos)}: indices "
                                  f"0..{len(infos) - 1}; a typo, or that camera is not up yet): "
                                  f"{available}")
            return index
        for i, info in enumerate(infos):
            if c.serial is not None and _safe_attr(info, "serial_number") != c.serial:
                continue
            if c.device_id is not None and _safe_attr(info, "id_") != c.device_id:
                continue
            return i
        picked = [(k, v) for k, v in (("serial", c.serial), ("device_id", c.device_id)) if v is not None]
        wanted = ", ".join(f"source.{k}={v!r}" for k, v in picked)
        # a typo and a camera unplugged or not booted yet look alike from here; the latter is
        # mended by a restart, so exit 1 (SourceError), naming the file and key for the former
        hint = ""
        if c.serial is not None and c.serial.isdigit():
            hint = ("; a serial written unquoted is read by YAML as a number, which loses leading "
                    'zeros (and 0-prefixed digits are read as octal): quote it as printed on the '
                    'camera, e.g. serial: "00123"')
        raise SourceError(f"{self.config_file}: source.{picked[0][0]}: no device matches {wanted} "
                          f"(a typo, or that camera is not connected); available: {available}{hint}")

    def _create_acquirer(self, index: int) -> Any:
        # harvesters' ImageAcquirer, made on the main thread, takes SIGINT for itself: its
        # handler destroys the acquirer, so Ctrl-C looked like a lost camera (reopened, counted)
        # and never reached the inspector's stop. The inspector's handler is put back.
        on_main = threading.current_thread() is threading.main_thread()
        previous = signal.getsignal(signal.SIGINT) if on_main else None
        try:
            return self._harvester.create(index)
        except Exception as e:  # in use by another process, access denied, ...
            raise SourceError(f"cannot open {self._label}: {first_line(e)}") from e
        finally:
            if on_main and previous is not None and signal.getsignal(signal.SIGINT) is not previous:
                signal.signal(signal.SIGINT, previous)

    def _node_map(self) -> Any:
        try:
            return self._ia.remote_device.node_map
        except Exception as e:  # gentl errors, or AttributeError from harvesters on a vanished device
            raise SourceError(f"cannot read the node map of {self._label}: {type(e).__name__}: "
                              f"{first_line(e)}") from e

    def _start(self) -> None:
        try:
            self._ia.start()
        except Exception as e:
            raise SourceError(f"{self._label} did not start acquisition: {first_line(e)}") from e

    def _configure(self, node_map: Any, node_error: type[BaseException]) -> None:
        """Write the configured nodes, in the order their limits depend on each other.

        PixelFormat changes the payload. The camera keeps the offsets of its last configuration and
        bounds Width by WidthMax - OffsetX (Height likewise), so a wider ROI than the last one
        would be refused while the old offset stands: offsets go to 0 first, then the size, then
        the configured offsets. Frame rate last because some cameras cap it by the image size.
        Every failure is a SourceError naming the camera, node and key, so that the pipeline's
        reopen loop (which only catches SourceError) keeps trying after a bad reopen.
        """
        c = self.cfg
        self._set_node(node_map, "PixelFormat", c.pixel_format, "pixel_format",
                       required=c.pixel_format != "Mono8", node_error=node_error)
        for node in ("OffsetX", "OffsetY"):
            self._zero_offset(node_map, node)
        for node, key, value, default in (("Width", "width", c.width, None),
                                          ("Height", "height", c.height, None),
                                          ("OffsetX", "offset_x", c.offset_x, 0),
                                          ("OffsetY", "offset_y", c.offset_y, 0)):
            if value is None:
                continue
            self._set_node(node_map, node, value, key, required=value != default, node_error=node_error)
        if c.fps is not None:
            # not required: many cameras have no enable node (a device lost here is a SourceError)
            self._set_node(node_map, "AcquisitionFrameRateEnable", True, "fps",
                           required=False, node_error=node_error)
            self._set_node(node_map, "AcquisitionFrameRate", float(c.fps), "fps",
                           required=True, node_error=node_error)

    def _zero_offset(self, node_map: Any, node: str) -> None:
        """Put an offset node that exists, is writable and is not 0 back to 0 (see _configure).

        Only a step towards the configured ROI, so a failure here is not the error to report:
        the writes of the configured size and offsets that follow name the node and key if the
        ROI really cannot be set.
        """
        try:
            if not node_map.has_node(node):
                return  # viky, and cameras without ROI offsets
            feature = getattr(node_map, node)
            if _is_writable(feature) and feature.value != 0:
                feature.value = 0
        except Exception as e:
            log.debug("%s: setting %s to 0 before the ROI size failed: %s", self._label, node,
                      first_line(e))

    def _set_node(self, node_map: Any, node: str, value: Any, key: str, *, required: bool,
                  node_error: type[BaseException]) -> None:
        """Write one node; a missing node is an error only when the config asked for a value."""
        feature = None
        try:
            if not node_map.has_node(node):
                if required:
                    raise SourceConfigError(self.config_file, f"source.{key}", f"{self._label} has no "
                                            f"{node} node, but the config asks for {value!r}; remove "
                                            "the key or pick another camera")
                log.debug("%s has no %s node; leaving source.%s at its default", self._label, node, key)
                return
            feature = getattr(node_map, node)
            feature.value = value
        except SourceError:
            raise
        except node_error as e:
            said = f"{self._label} rejected {node}={value!r}{_limits(feature)}: {first_line(e)}"
            if type(e).__name__ in _VALUE_REFUSALS:
                # the camera is there and says no to the value: the config's fault, which no
                # restart mends (exit 2)
                raise SourceConfigError(self.config_file, f"source.{key}", said) from e
            # a node locked or busy (AccessException, a timeout) may pass: exit 1, restarted
            raise SourceError(f"{said} (source.{key})") from e
        except Exception as e:
            # gentl errors (the device went away mid-write), TypeError from the bindings (the node
            # has another type than this key expects), harvesters' own AttributeError/IndexError
            raise SourceError(f"{self._label}: writing {node}={value!r} (source.{key}) failed: "
                              f"{type(e).__name__}: {first_line(e)}") from e

    # -- reading ---------------------------------------------------------------------------------

    def read(self) -> Frame | None:
        """Fetch the next frame, copying it out of the producer's buffer.

        Raises SourceError on a fetch timeout or a lost device (the pipeline decides whether to
        reopen) and FrameError on a broken buffer (the pipeline drops it and reads on). A closed
        source (or one whose reopen failed) raises SourceError too, so the pipeline's reopen loop
        keeps trying instead of taking it for the end of the stream.
        """
        with self._lock:
            if self._ia is None or self._closing:
                raise SourceError(f"{self._label} is not open (closed, or the last open failed)")
            if self.cfg.frames is not None and self._next_id >= self.cfg.frames:
                return None
            buffer = self._fetch()
            t_host = time.time_ns()
            frame_id = self._next_id
            self._next_id += 1
            if buffer is None:
                # No device id to go by: it took one frame length, and the next buffer rebases.
                self._strip_index += 1
                self._last_device_id = None
                raise FrameError(f"{self._label}: frame {frame_id} arrived without image information")
            try:
                with buffer:  # requeues the buffer on exit, also when the copy fails
                    # Placed before the copy: a broken buffer still took its place on the strip.
                    device_frame_id = _device_frame_id(buffer)
                    strip_index = self._advance_strip(device_frame_id, frame_id)
                    image = self._copy_image(buffer, frame_id)
                    meta = self._meta(device_frame_id, strip_index)
                    t_capture = self._device_timestamp(buffer)
            except self._gentl_excs as e:
                raise SourceError(f"{self._label}: buffer of frame {frame_id} became invalid, device "
                                  f"lost? {first_line(e)}") from e
        if t_capture is not None:
            meta["device_timestamp_ns"] = t_capture
        if t_capture is None or self.cfg.timestamp == "host":
            t_capture = t_host
        along = self.cfg.mm_per_px_along
        strip_pos = strip_index * image.shape[0] * along if along else 0.0
        return Frame(camera_id=self.camera_id, frame_id=frame_id, t_capture_ns=t_capture,
                     image=image, strip_pos_mm=strip_pos, meta=meta)

    def _advance_strip(self, device_frame_id: int | None, frame_id: int) -> int:
        """Strip index of the buffer just fetched, from the device frame id delta (see class docs).

        Frames the device id skipped are added to ``_skipped_pending`` for the next frame's meta.
        """
        last, self._last_device_id = self._last_device_id, device_frame_id
        step = 1
        if device_frame_id is not None and last is not None:
            if device_frame_id - last > MAX_DEVICE_ID_JUMP:
                # not a frame count (a timestamp, garbage): it must not move every later position
                self._warn_device_id(f"jumped from {last} to {device_frame_id} at frame {frame_id}")
            elif device_frame_id > last:
                step = device_frame_id - last
                self._skipped_pending += step - 1
            else:
                self._warn_device_id(f"went from {last} to {device_frame_id} at frame {frame_id} "
                                     "(not increasing: reset or wrap-around)")
        elif device_frame_id is None:
            self._warn_device_id(f"is missing at frame {frame_id}")
        # 0 is taken as a value: GenTL counters may start there; a producer that always reports 0
        # shows up as "not increasing" on the next frame.
        self._strip_index += step
        return self._strip_index

    def _warn_device_id(self, what: str) -> None:
        if self._warned_device_id:
            return
        self._warned_device_id = True
        log.warning("%s: device frame id %s; such frames are placed one frame length after the "
                    "previous one and frames the camera lost there are not counted (said once)",
                    self._label, what)

    def _fetch(self) -> Any:
        ia = self._ia
        if not ia.is_valid():
            raise SourceError(f"{self._label}: image acquirer was destroyed (device lost); reopen")
        timeout = self.cfg.fetch_timeout_s
        try:
            return ia.fetch(timeout=timeout)
        except self._timeout_exc as e:
            raise SourceError(f"camera {self._label} timed out after {timeout:g}s without a frame "
                              "(source.fetch_timeout_s); check trigger, cable and frame rate") from e
        except self._lost_excs as e:
            raise SourceError(f"{self._label}: fetch failed, device lost? {first_line(e)}") from e

    def _copy_image(self, buffer: Any, frame_id: int) -> np.ndarray:
        """The buffer's image as an owned array, or FrameError naming camera and frame."""
        payload = buffer.payload
        if payload is None or not payload.components or not _is_complete(buffer):
            raise FrameError(f"{self._label}: frame {frame_id} is incomplete")
        comp = payload.components[0]
        try:
            return image_from_buffer(comp.data_format, int(comp.width), int(comp.height), comp.data)
        except ValueError as e:
            raise FrameError(f"{self._label}: frame {frame_id}: {e}") from e

    def _meta(self, device_frame_id: int | None, strip_index: int) -> dict:
        meta: dict[str, Any] = {"strip_frame_index": strip_index}
        if device_frame_id is not None:
            meta["device_frame_id"] = device_frame_id
        if self._skipped_pending:
            meta["camera_skipped"], self._skipped_pending = self._skipped_pending, 0
        if self.cfg.mm_per_px_across:
            meta["mm_per_px_across"] = self.cfg.mm_per_px_across
        if self.cfg.mm_per_px_along:
            meta["mm_per_px_along"] = self.cfg.mm_per_px_along
        return meta

    def _device_timestamp(self, buffer: Any) -> int | None:
        """The buffer's timestamp in ns, or None where the producer has none (viky)."""
        try:
            ts = int(buffer.timestamp_ns)
        except self._not_available_excs:
            return None
        return ts or None

    # -- closing ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop, destroy the acquirer and reset the Harvester; safe to call twice or after errors.

        Called from another thread while read() waits in a fetch, it waits for that fetch to end
        (at most ``fetch_timeout_s``); that read then returns its frame, the next one raises.
        """
        self._closing = True
        with self._lock:
            ia, self._ia = self._ia, None
            self._streaming = False
            harvester, self._harvester = self._harvester, None
            self._closing = False
        if ia is not None:
            for step in (ia.stop, ia.destroy):
                try:
                    step()
                except Exception as e:  # device already gone: nothing left to release
                    log.warning("%s: %s during close failed: %s", self._label, step.__name__,
                                first_line(e))
        if harvester is not None:
            try:
                harvester.reset()
            except Exception as e:
                log.warning("%s: resetting harvester failed: %s", self._label, first_line(e))

    def describe(self) -> str:
        """Device, format, size and rate; the live node values once open, the config before."""
        c = self.cfg
        if self._ia is None:
            size = f"{c.width or '?'}x{c.height or '?'}"
            return (f"genicam {c.cti} ({self.camera_id}) {c.pixel_format} {size} "
                    f"@ {c.fps or '?'} fps (not open)")
        nm = self._ia.remote_device.node_map

        def node(name: str) -> Any:
            try:
                return getattr(nm, name).value if nm.has_node(name) else "?"
            except Exception:  # device gone: describe() must still give a line for the log
                return "?"

        fps = node("AcquisitionFrameRate")
        fps_text = f"{fps:g}" if isinstance(fps, float) else str(fps)
        return (f"genicam {self._label} {node('PixelFormat')} {node('Width')}x{node('Height')} "
                f"@ {fps_text} fps")


def image_from_buffer(pixel_format: str, width: int, height: int,
                      data: np.ndarray | None) -> np.ndarray:
    """Copy a GenICam image (1-D uint8 ``data``) into an owned HxW or HxWx3 RGB uint8 array.

    This is the one allocation per frame: the producer's buffer is requeued right after, so the
    frame must own its pixels. Rows may carry padding, which is dropped. Raises ValueError for a
    format that is not supported or for data too short for the size (an incomplete buffer).

    Example::

        image_from_buffer("BGRa8", 2, 1, np.array([1, 2, 3, 0, 4, 5, 6, 0], np.uint8))
        # -> [[[3, 2, 1], [6, 5, 4]]]
    """
    layout = _LAYOUTS.get(pixel_format)
    if layout is None:
        raise ValueError(f"pixel format {pixel_format!r} is not supported; use one of "
                         f"{', '.join(SUPPORTED_PIXEL_FORMATS)}")
    bpp, conversion = layout
    line = width * bpp
    size = 0 if data is None else int(data.size)
    if data is None or height <= 0 or size < height * line or size % height:
        raise ValueError(f"incomplete: {size} bytes for {width}x{height} {pixel_format} "
                         f"(expected {height * line})")
    # A padded row is longer than `line`; slicing the view drops the padding without copying.
    rows = data.reshape(height, size // height)[:, :line]
    if conversion is None:
        return rows.reshape((height, width) if bpp == 1 else (height, width, bpp)).copy()
    out = np.empty((height, width, 3), np.uint8)
    cv2.cvtColor(rows.reshape(height, width, bpp), conversion, dst=out)
    return out


#: the entry point every GenTL producer exports (GenTL standard, GCInitLib)
_GENTL_ENTRY = "GCInitLib"


def _check_producer(cti: Path, config_file: str) -> None:
    """Refuse a ``source.cti`` that exists but is no GenTL producer: not a shared library this
    machine can load (a text file, another architecture, a missing dependency) or one without
    the GenTL entry points. An install or config error no restart mends: exit 2, naming the
    file and key (exit 1 had systemd restart the unit for ever)."""
    import ctypes

    try:
        lib = ctypes.CDLL(str(cti))
    except OSError as e:
        raise SourceConfigError(config_file, "source.cti", f"{cti} is not a loadable GenTL "
                                f"producer ({first_line(e)}); give the camera vendor's .cti file, "
                                "built for this machine") from None
    if not hasattr(lib, _GENTL_ENTRY):
        raise SourceConfigError(config_file, "source.cti", f"{cti} is a shared library but not a "
                                f"GenTL producer (it has no {_GENTL_ENTRY}); give the camera "
                                "vendor's .cti file")


def _device_frame_id(buffer: Any) -> int | None:
    """The GenTL buffer's frame id (BUFFER_INFO_FRAMEID), or None where the producer has none."""
    value = _safe_attr(buffer.module, "frame_id")
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _is_writable(feature: Any) -> bool:
    """GenApi's access check; a node it cannot judge is taken as writable (the write will tell)."""
    try:
        from genicam.genapi import is_writable
        return bool(is_writable(feature))
    except Exception:
        return True


def _is_complete(buffer: Any) -> bool:
    """GenTL's own completeness flag; producers that cannot tell are trusted."""
    try:
        return bool(buffer.module.is_complete())
    except Exception:
        return True


def _limits(feature: Any) -> str:
    """`` (allowed: ...)`` from a node's range or symbolics, to put into a rejection message."""
    symbolics = _safe_attr(feature, "symbolics")
    if symbolics:
        return f" (allowed: {', '.join(map(str, symbolics))})"
    lo, hi = _safe_attr(feature, "min"), _safe_attr(feature, "max")
    if lo is not None and hi is not None:
        inc = _safe_attr(feature, "inc")
        step = f" step {inc}" if isinstance(inc, int) and inc > 1 else ""
        return f" (allowed: {lo}..{hi}{step})"
    return ""
