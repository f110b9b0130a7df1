"""Camera configuration: one YAML file per camera, validated at load.

Every problem is reported as one :class:`~inspector.errors.ConfigError` naming the file, the
dotted key and what was expected, e.g.
``configs/cam1.yaml: source.fps: Input should be greater than or equal to 0 (got -5)``.
Relative paths in the file resolve against the file's own folder.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError,
                      field_validator)

from inspector.alarms.config import UNION_TAGS as _ALARM_TAGS
from inspector.alarms.config import AlarmsConfig
from inspector.daemon_config import DaemonConfig
from inspector.engines import OnnxRuntimeConfig, TensorRTConfig
from inspector.errors import ConfigError, validator_message, yaml_problem
from inspector.metrics import MetricsConfig
from inspector.postprocess import PostprocessConfig
from inspector.publish import PublishConfig
from inspector.recorder import RecordConfig
from inspector.sources import GenicamConfig, ReplayConfig, SyntheticConfig

SourceConfig = Annotated[Union[GenicamConfig, ReplayConfig, SyntheticConfig], Field(discriminator="type")]


def _engine_tag(v: Any) -> str | None:
    # ``type`` may be left out: onnxruntime is the engine that runs everywhere
    if isinstance(v, dict):
        return v.get("type", "onnxruntime")
    return getattr(v, "type", None)


EngineConfig = Annotated[Union[Annotated[OnnxRuntimeConfig, Tag("onnxruntime")],
                               Annotated[TensorRTConfig, Tag("tensorrt")]],
                         Discriminator(_engine_tag)]
_TAGS = {"genicam", "replay", "synthetic", "onnxruntime", "tensorrt"} | _ALARM_TAGS


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    bundle: str = Field(..., description="model bundle folder; relative to the config file")
    engine: EngineConfig = Field(default_factory=OnnxRuntimeConfig)
    max_batch: int = Field(0, ge=0, description="tiles per engine call; 0 = all tiles of a frame")
    postprocess: dict[str, Any] = Field(default_factory=dict,
                                        description="overrides of the bundle's post-processing")

    @field_validator("postprocess")
    @classmethod
    def _known_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(v) - set(PostprocessConfig.model_fields))
        if unknown:
            raise ValueError(f"unknown post-processing key(s) {unknown}; "
                             f"known: {sorted(PostprocessConfig.model_fields)}")
        return v


class FrameSpec(BaseModel):
    """The frame shape the pipeline expects; frames of another shape or dtype are dropped."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    height: int = Field(..., ge=1)
    width: int = Field(..., ge=1)
    channels: Literal[1, 3] = 1


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    queue_size: int = Field(4, ge=1, le=1024, description="frames waiting for the engine")
    backpressure: bool = Field(False, description="grab waits for a free queue slot instead of dropping "
                                                  "(recorded or synthetic sources only; a camera cannot wait)")
    frame: FrameSpec | None = Field(None, description="expected shape; default: the first frame's")
    reopen_source: bool = Field(True, description="reopen a camera that stops delivering")
    reopen_backoff_s: tuple[float, float] = Field((0.5, 10.0), description="first and longest wait")

    @field_validator("reopen_backoff_s")
    @classmethod
    def _backoff_order(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"must be [first, longest] with 0 < first <= longest, got {list(v)}")
        return v


class GeometryConfig(BaseModel):
    """Pixel size on the strip; a source that knows better (frame metadata) wins.
    ``inspector calibrate geometry`` prints this section from strip width, line speed, etc."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # .inf passed gt=0
    mm_per_px_across: float | None = Field(None, gt=0)
    mm_per_px_along: float | None = Field(None, gt=0)
    mm_per_encoder_count: float | None = Field(
        None, gt=0, description="strip position = frame.meta[encoder_key] x this (wins over frame numbers)")
    encoder_key: str = Field("encoder_count", min_length=1, description="frame metadata key of the count")


class PreprocessConfig(BaseModel):
    """Corrections applied to each frame before the model (and before its residual)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    flat_field: str | None = Field(None, description="gain/offset maps (.npz from `inspector calibrate "
                                                     "flat-field`); relative to the config file")


class StatusConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    interval_s: float = Field(1.0, gt=0)
    window: int = Field(256, ge=8, description="frames the fps and latency figures cover")


class InspectorConfig(BaseModel):
    """The whole configuration of one camera's daemon."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    camera_id: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    source: SourceConfig
    model: ModelConfig
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    geometry: GeometryConfig = Field(default_factory=GeometryConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    status: StatusConfig = Field(default_factory=StatusConfig)
    alarms: AlarmsConfig = Field(default_factory=AlarmsConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    daemon: DaemonConfig = Field(default_factory=DaemonConfig)
    record: RecordConfig = Field(default_factory=RecordConfig)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    #: folder of the file this was loaded from; relative paths resolve against it
    base_dir: Path = Field(default_factory=Path.cwd, exclude=True)
    source_file: str = Field("<memory>", exclude=True)

    def resolve(self, p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() else (self.base_dir / path)


def _key(loc: tuple) -> str:
    parts: list[str] = []
    for i, p in enumerate(loc):
        # pydantic puts the union tag in the path (source.synthetic.fps); users wrote source.fps
        # (alarms.drivers.0.modbus.port: the tag follows a list index there)
        if isinstance(p, str) and p in _TAGS and i > 0 and (loc[i - 1] in ("source", "engine")
                                                            or isinstance(loc[i - 1], int)):
            continue
        parts.append(str(p))
    return ".".join(parts)


def validation_error(file: str, e: ValidationError) -> ConfigError:
    err = e.errors()[0]
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required key is missing"
    elif isinstance(err.get("input"), float) and math.isnan(err["input"]):
        # "Input should be greater than 0 (got nan)" described a range nan is not outside
        msg = "must be a finite number (got nan)"
    elif "input" in err and not isinstance(err["input"], (dict, list)):
        msg = f"{msg} (got {err['input']!r})"
    if err["type"] == "union_tag_invalid":
        ctx = err.get("ctx", {})
        msg = f"unknown type {ctx.get('tag')!r}; expected one of {ctx.get('expected_tags')}"
    msg = validator_message(msg)
    key = _key(err["loc"])
    if err["type"] == "union_tag_invalid":
        key = f"{key}.type" if key else "type"
    if err["type"] == "union_tag_not_found":  # e.g. an alarms.drivers entry without its type
        field = str(err.get("ctx", {}).get("discriminator", "type")).strip("'")
        key, msg = (f"{key}.{field}" if key else field), "required key is missing"
    extra = f" (+{len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return ConfigError(file, key or None, msg + extra)


def parse_config(raw: Any, file: str = "<memory>", base_dir: Path | None = None,
                 check_paths: bool = True) -> InspectorConfig:
    if not isinstance(raw, dict):
        raise ConfigError(file, None, "expected a mapping of keys at the top level")
    try:
        cfg = InspectorConfig.model_validate(raw)
    except ValidationError as e:
        raise validation_error(file, e) from None
    _check_postprocess_overrides(file, cfg.model.postprocess)
    cfg.base_dir = base_dir or Path.cwd()
    cfg.source_file = file
    if isinstance(cfg.source, GenicamConfig) and cfg.pipeline.backpressure:
        # the grab stage would block on a camera that goes on framing: frames are then lost
        # inside the camera (camera_skipped) instead of counted as queue_full
        raise ConfigError(file, "pipeline.backpressure", "true, but a camera cannot wait for the "
                          "engine (recorded or synthetic sources only); leave it false: frames that "
                          "find the queue full are dropped and counted as queue_full")
    if check_paths:
        _check_paths(cfg)
    return cfg


def _check_postprocess_overrides(file: str, overrides: dict[str, Any]) -> None:
    """Each ``model.postprocess`` override holds what the bundle's own section may hold (k1: .nan
    or -3 was taken, and the model then found nothing); the key named is the override's."""
    for key, value in overrides.items():
        try:
            PostprocessConfig.model_validate({key: value})
        except ValidationError as e:
            err = validation_error(file, e)
            raise ConfigError(file, f"model.postprocess.{err.key}" if err.key else "model.postprocess",
                              err.problem) from None


def _check_paths(cfg: InspectorConfig) -> None:
    f = cfg.source_file
    bundle = cfg.resolve(cfg.model.bundle)
    try:
        if not bundle.is_dir():
            if bundle.exists():
                raise ConfigError(f, "model.bundle", f"{bundle} is a file, not a model bundle folder")
            raise ConfigError(f, "model.bundle", f"model bundle folder {bundle} not found")
        if not (bundle / "bundle.yaml").is_file():
            raise ConfigError(f, "model.bundle", f"{bundle} has no bundle.yaml (not a model bundle)")
    except PermissionError:
        # a folder on the way this user may not search: the install's fault (exit 2), not a bare
        # Errno 13 (exit 1, which systemd restarts for ever)
        raise ConfigError(f, "model.bundle", f"{bundle}: cannot read: permission denied (the "
                          "service runs as its own user: make the bundle readable to it)") from None
    src = cfg.source
    if isinstance(src, GenicamConfig):
        from inspector.sources.genicam import BUILTIN_VIKY, default_viky_cti
        cti = (default_viky_cti() or Path("<viky.cti missing from the genicam package>")
               if src.cti == BUILTIN_VIKY else cfg.resolve(src.cti))
        if not cti.is_file():
            raise ConfigError(f, "source.cti", f"GenTL producer {cti} not found (expected a .cti file)")
    ff = cfg.preprocess.flat_field
    if ff and cfg.resolve(ff).is_dir():
        raise ConfigError(f, "preprocess.flat_field", f"{cfg.resolve(ff)} is a folder, expected an .npz "
                          "file from `inspector calibrate flat-field`")
    if ff and not cfg.resolve(ff).is_file():
        raise ConfigError(f, "preprocess.flat_field", f"flat-field file {cfg.resolve(ff)} not found "
                          f"(expected an .npz from `inspector calibrate flat-field`)")
    if isinstance(src, ReplayConfig):
        p = cfg.resolve(src.path)
        if not p.exists():
            raise ConfigError(f, "source.path", f"{p} not found (expected a folder of images or a video)")
        if p.is_dir():
            from inspector.sources.replay import has_images
            if not has_images(p, src.pattern):
                # exit 2 at start, not 1: under systemd an exit 1 is restarted every 5 s for ever
                raise ConfigError(f, "source.pattern", f"no images matching {src.pattern!r} in {p} "
                                  "(source.path)")
        else:
            from inspector.sources.replay import IMAGE_EXTENSIONS, video_problem
            problem = None if p.suffix.lower() in IMAGE_EXTENSIONS else video_problem(p)
            if problem:  # bad input, exit 2: not a camera fault to restart for
                raise ConfigError(f, "source.path", problem)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: plain YAML keeps the last one,
    so a second ``publish:`` section would silently replace the first."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base`: merged keys may be overridden by explicit ones, by design
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})",
                        key_node.start_mark)
                seen[key] = key_node.start_mark.line
            except TypeError:  # an unhashable key: let SafeLoader report it as usual
                continue
        return super().construct_mapping(node, deep)


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict:
    """A YAML file's top-level mapping ({} when empty); errors name the file and the line."""
    p = Path(path)
    file = str(path)
    try:
        text = p.read_text()
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except IsADirectoryError:
        raise ConfigError(file, None, f"is a folder, expected the {what} (a YAML file)") from None
    except NotADirectoryError:
        raise ConfigError(file, None, f"{what} not found (a part of the path is a file, not a "
                          "folder)") from None
    except FileNotFoundError:
        raise ConfigError(file, None, f"{what} not found") from None
    except PermissionError:
        # exit 2, not 1: a file the service user cannot read is the install's fault, and
        # systemd should not restart the unit every few seconds for ever
        raise ConfigError(file, None, f"cannot read the {what}: permission denied (the service runs "
                          "as its own user: make the file readable to it)") from None
    except OSError as e:
        raise ConfigError(file, None, f"cannot read the {what}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(file, None, yaml_problem(e)) from None
    except UnicodeDecodeError:
        raise ConfigError(file, None, "not a text file") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(file, None, "expected a mapping of keys at the top level")
    return raw


def load_config(path: str | Path, check_paths: bool = True) -> InspectorConfig:
    """Read, validate and path-check one camera config file."""
    raw = read_yaml_mapping(path)
    return parse_config(raw, str(path), Path(path).resolve().parent, check_paths)
