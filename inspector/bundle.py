"""Model bundles: a folder with ONNX graph(s) and ``bundle.yaml``.

``bundle.yaml`` (format 1)::

    format: 1
    name: demo-arcd
    kind: arcd                      # model adapter: arcd | clgan | fuzzymask
    graphs:
      model: {file: model.onnx, sha256: <hex>}
    input:
      name: image                   # graph input tensor
      tile: [256, 256]              # model input H, W; frames are tiled to it (or fitted: below)
      channels: 1                   # 1 = grey, 3 = RGB
      layout: NCHW
      dtype: float32
      mean: [0.5]                   # per channel, applied to pixel/255
      std: [0.5]
      batch: 0                      # 0 = dynamic batch axis, N = fixed batch size
      fit: tile                     # tile | square_pad (arcd only, square tile; spec §2.2)
      pad_align: top                # top | center: where square_pad puts the frame
    outputs: {probabilities: probs, reconstruction: reconstruction}   # arcd may add region: region
    classes: [background, inclusion, patches, scratches]
    region: {name: machine region, threshold: 0.5}   # optional, arcd only, iff outputs.region
    tiling: {overlap: 32}
    postprocess: {...}              # see inspector.postprocess.PostprocessConfig
    provenance: {data: ..., training_config: ..., commit: ..., metrics: {...}, created: ...}

Every graph's sha256 is checked at load: a changed or truncated file is refused, never run.
"""

from __future__ import annotations

import difflib
import hashlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from inspector.errors import BundleError, InspectorError, validator_message, yaml_problem
from inspector.fileio import atomic_write_text
from inspector.postprocess import PostprocessConfig

BUNDLE_FILE = "bundle.yaml"

#: a tile side in pixels (``input.tile``); 0 or less would make no tiles or a tile grid of nonsense
TileSide = Annotated[int, Field(ge=1)]


class GraphRef(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    file: str
    sha256: str


class InputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str = "image"
    tile: tuple[TileSide, TileSide] = (256, 256)
    channels: Literal[1, 3] = 1
    layout: Literal["NCHW"] = "NCHW"
    dtype: Literal["float32"] = "float32"
    mean: list[float] = Field(default_factory=lambda: [0.5])
    std: list[float] = Field(default_factory=lambda: [0.5])
    batch: int = Field(0, ge=0)
    #: how a frame meets the model input. ``tile``: cut into overlapping native-resolution tiles,
    #: outputs stitched. ``square_pad`` (the ARCD thesis's squaring, spec §2.2): the whole frame
    #: zero-padded to a max(H, W) square, resized (bilinear) to ``tile``, run as one item, outputs
    #: resized back and cropped to the frame. Written only when not ``tile``, so bundles from
    #: before the key are written byte for byte as they were.
    fit: Literal["tile", "square_pad"] = "tile"
    #: where ``square_pad`` places the frame in the square: ``top`` (top-left; padding at the
    #: bottom/right) or ``center`` (the odd pixel of padding at the bottom/right). Training must
    #: have used the same choice (``data.square_pad``); ignored with ``fit: tile``
    pad_align: Literal["top", "center"] = "top"

    @model_validator(mode="after")
    def _per_channel(self) -> "InputSpec":
        for key in ("mean", "std"):
            vals = getattr(self, key)
            if len(vals) not in (1, self.channels):
                raise ValueError(f"{key} needs 1 or {self.channels} values, got {len(vals)}")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")
        return self


class TilingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    overlap: int = Field(32, ge=0)


class RegionSpec(BaseModel):
    """The optional second sub-task of an arcd bundle (the thesis's machine-region map): the graph
    output ``outputs.region`` holds p(region) per pixel; a pixel is region where p >= threshold."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    #: what the region is, free text; published with every frame
    name: str = Field(min_length=1)
    threshold: float = Field(0.5, gt=0.0, le=1.0)


class BundleSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    format: Literal[1] = 1
    name: str
    kind: Literal["arcd", "clgan", "fuzzymask"]
    graphs: dict[str, GraphRef]
    input: InputSpec
    outputs: dict[str, str]
    classes: list[str]
    tiling: TilingSpec = Field(default_factory=TilingSpec)
    postprocess: PostprocessConfig
    #: earlier post-processing sections, newest last; calibration appends here
    postprocess_history: list[dict[str, Any]] = Field(default_factory=list)
    provenance: dict[str, Any] = Field(default_factory=dict)
    #: free-form parameters of the model kind (e.g. fuzzymask iterations)
    kind_params: dict[str, Any] = Field(default_factory=dict)
    #: ARCD's optional machine-region head (present exactly when ``outputs.region`` is)
    region: RegionSpec | None = None

    @model_validator(mode="after")
    def _region_with_its_output(self) -> "BundleSpec":
        # The two keys say the same thing from both sides (what to publish, where the graph
        # holds it); one without the other is a half-edited bundle, refused at load rather than
        # publishing a region with no name and threshold or silently dropping a trained head.
        has_key, has_out = self.region is not None, "region" in self.outputs
        if has_key and self.kind != "arcd":
            raise ValueError(f"region: only kind arcd has a region head (this bundle is kind {self.kind})")
        if has_key and not has_out:
            raise ValueError("region: set, but outputs.region (the graph output holding the region "
                             "probability) is missing; give both or neither")
        if has_out and not has_key:
            if self.kind != "arcd":
                raise ValueError(f"outputs.region: only kind arcd has a region head (this bundle is "
                                 f"kind {self.kind})")
            raise ValueError("outputs.region: set, but the region key (region: {name: ..., "
                             "threshold: ...}) is missing; give both or neither")
        return self

    @model_validator(mode="after")
    def _square_pad_for_arcd(self) -> "BundleSpec":
        # Only ARCD's thesis pads and resizes (spec §2.2); CLGAN and the fuzzy-mask inpainter are
        # trained on native-resolution tiles, and fuzzymask cuts cells of its own, so a padded,
        # resized frame would be a different input from the one they learnt.
        if self.input.fit != "square_pad":
            return self
        if self.kind != "arcd":
            raise ValueError(f"input.fit: square_pad is only for kind arcd (this bundle is kind "
                             f"{self.kind}, which tiles frames: fit: tile)")
        th, tw = self.input.tile
        if th != tw:
            raise ValueError(f"input.fit: square_pad resizes the padded square frame to input.tile, "
                             f"which must be square (got [{th}, {tw}])")
        return self

    @model_validator(mode="after")
    def _overlap_inside_tile(self) -> "BundleSpec":
        # The tile stride is tile - overlap, floored at 1 by the tiler: an overlap of a whole tile
        # or more tiles a 256x1600 frame into 1345 tiles at stride 1 (353 MB of input per frame)
        # instead of 7, so it is refused, naming the key, rather than run that slowly.
        smallest = min(self.input.tile)
        if self.tiling.overlap < smallest:
            return self
        if "overlap" not in self.tiling.model_fields_set:
            # The default (32) was chosen for the 224/256-pixel tiles; a spec with smaller tiles that
            # never set it gets the largest overlap its tiles allow, which cuts frames exactly as
            # the default did (stride 1) rather than refusing a bundle nobody misconfigured.
            self.tiling = TilingSpec(overlap=smallest - 1)
            return self
        raise ValueError(f"tiling.overlap={self.tiling.overlap} must be smaller than the tile "
                         f"(input.tile {list(self.input.tile)}): tiles advance by tile - overlap pixels")


class Bundle:
    """A validated bundle on disk."""

    def __init__(self, path: Path, spec: BundleSpec):
        self.path = path
        self.spec = spec

    def graph_path(self, key: str = "model") -> Path:
        if key not in self.spec.graphs:
            raise BundleError(f"{self.path / BUNDLE_FILE}: graphs.{key}: no such graph "
                              f"(has {sorted(self.spec.graphs)})")
        return self.path / self.spec.graphs[key].file

    def __repr__(self) -> str:
        return f"Bundle({self.path}, kind={self.spec.kind})"


#: the end of the error for a bundle file the service user may not read (exit 2: the install's
#: fault, which a restart would meet again, like an unreadable config)
_DENIED = "cannot read: permission denied (the service runs as its own user: make the bundle readable to it)"


def _present(path: Path, folder: bool = False) -> bool:
    """Whether ``path`` is a file (``folder``: a folder). A look refused for lack of permission
    (a folder on the way not searchable) is a BundleError naming it, not "missing": Python 3.11's
    ``is_file()`` raises a bare PermissionError then (exit 1), later ones say False."""
    try:
        if path.is_dir() if folder else path.is_file():
            return True
        path.stat()
    except PermissionError:
        raise BundleError(f"{path}: {_DENIED}") from None
    except OSError:
        pass
    return False


def folder_state(folder: Path) -> dict[str, tuple[int, int]] | None:
    """Size and modification time of each file directly in ``folder`` (None: no such folder): to
    tell what an export stopped part-way changed in a bundle folder, graphs included."""
    try:
        return {p.name: (st.st_size, st.st_mtime_ns) for p in Path(folder).iterdir()
                if p.is_file() and not p.name.startswith(".") for st in [p.stat()]}
    except OSError:
        return None


def export_left(out: Path, before: dict[str, tuple[int, int]] | None) -> str:
    """What an export stopped part-way left in ``out``, given :func:`folder_state` before it."""
    now = folder_state(out)
    if before is None:
        if now is None:
            return "nothing written (the --out folder it had made was removed)"
        if BUNDLE_FILE not in now:
            return f"no bundle written ({out} holds no {BUNDLE_FILE})"
        return f"the bundle in {out} was written before the stop"
    if now == before:
        return f"{out} was left as it was (no bundle written)"
    try:
        load_bundle(out)
    except InspectorError as e:
        return f"{out} was partly replaced before the stop and does not load ({e}): export again"
    return f"{out} holds the new bundle, written whole before the stop took effect (it loads)"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


#: the sections whose keys an unknown key is compared with, by their place in bundle.yaml
_SECTIONS: dict[tuple, type[BaseModel]] = {(): BundleSpec, ("input",): InputSpec,
                                           ("tiling",): TilingSpec, ("region",): RegionSpec,
                                           ("postprocess",): PostprocessConfig}


def _unknown_key(err: Any) -> str:
    """``kidn: unknown key (did you mean kind?)`` for an ``extra_forbidden`` error."""
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc)
    section = _SECTIONS.get(loc[:-1])
    close = difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1) if section else []
    return f"{key}: unknown key" + (f" (did you mean {close[0]}?)" if close else "")


def _spec_problem(e: ValidationError) -> str:
    """The first problem of a bundle.yaml, worded as a camera config's errors are.

    A misspelt key gives two errors, the unknown key and the required one now missing; the
    unknown key goes first, with the key it is closest to, since that is where the typo is
    (``kind: required key is missing`` alone sent people looking for a key they had written).
    """
    errs = e.errors()
    unknown = [err for err in errs if err["type"] == "extra_forbidden"]
    err = errs[0]
    key = ".".join(str(p) for p in err["loc"])
    msg = {"extra_forbidden": "unknown key", "missing": "required key is missing"}.get(
        err["type"], validator_message(err["msg"]))
    # a check across sections (BundleSpec's own validators) has no location: its message
    # names the keys itself
    first = f"{key}: {msg}" if key else msg
    if not unknown:
        return first
    text = _unknown_key(unknown[0])
    return text if unknown[0] is err else f"{text}; {first}"


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read and validate ``path/bundle.yaml``; check each graph exists and matches its sha256."""
    root = Path(path)
    meta = root / BUNDLE_FILE
    if not _present(root, folder=True):
        if _present(root):
            raise BundleError(f"{root}: is a file, not a model bundle folder")
        raise BundleError(f"{root}: model bundle folder not found")
    if _present(meta, folder=True):
        raise BundleError(f"{meta}: is a folder, expected the bundle's YAML file")
    if not _present(meta):
        raise BundleError(f"{meta}: missing (a bundle folder holds bundle.yaml and its graphs)")
    from inspector.config import _UniqueKeyLoader  # here: inspector.config imports this module's users

    try:
        # a key given twice is refused, as in a camera config (plain YAML kept the last one)
        raw = yaml.load(meta.read_text(), Loader=_UniqueKeyLoader)
    except PermissionError:
        raise BundleError(f"{meta}: {_DENIED}") from None
    except yaml.YAMLError as e:
        raise BundleError(f"{meta}: {yaml_problem(e)}") from None
    except UnicodeDecodeError:
        raise BundleError(f"{meta}: not valid YAML: not a text file") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{meta}: expected a mapping at the top level")
    try:
        spec = BundleSpec.model_validate(raw)
    except ValidationError as e:
        raise BundleError(f"{meta}: {_spec_problem(e)}") from e
    bundle = Bundle(root, spec)
    for key, ref in spec.graphs.items():
        gp = root / ref.file
        if not _present(gp):
            raise BundleError(f"{gp}: graph '{key}' named in {meta} is missing")
        if verify:
            try:
                digest = sha256_file(gp)
            except PermissionError:
                raise BundleError(f"{gp}: {_DENIED}") from None
            if digest != ref.sha256:
                raise BundleError(f"{gp}: sha256 {digest[:12]}… does not match {meta} "
                                  f"({ref.sha256[:12]}…): the file is corrupt or was replaced")
    return bundle


def write_bundle(path: str | Path, spec: BundleSpec) -> Path:
    """Write ``bundle.yaml`` (graphs must already be in the folder; their sha256 is recomputed).

    The file is replaced atomically: a write that fails part-way (disk full) leaves the previous
    ``bundle.yaml`` in place rather than a truncated one that may still parse with keys lost."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    graphs = {k: GraphRef(file=g.file, sha256=sha256_file(root / g.file)) for k, g in spec.graphs.items()}
    spec = spec.model_copy(update={"graphs": graphs})
    data = spec.model_dump(mode="json")
    if data.get("region") is None:
        # bundles without a region head are written exactly as before the key existed
        data.pop("region", None)
    inp = data["input"]
    if inp.get("fit") == "tile":
        # tiled bundles (all bundles before the key) likewise; a pad_align other than the default
        # is kept, though tiling ignores it, rather than dropping what someone wrote
        inp.pop("fit")
        if inp.get("pad_align") == "top":
            inp.pop("pad_align")
    return atomic_write_text(root / BUNDLE_FILE, yaml.safe_dump(data, sort_keys=False))
