import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ROOT
from inspector.bundle import load_bundle
from inspector.errors import BundleError, EngineError


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_corrupt_graph_is_refused(toy_bundle, tmp_path):
    b = copy(toy_bundle, tmp_path / "b")
    with open(b / "model.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(BundleError, match="sha256 .* does not match"):
        load_bundle(b)


def test_a_graph_onnxruntime_cannot_load_is_a_bundle_error_naming_it(toy_bundle, tmp_path):
    # Bad when its sha256 was recorded: the hash check passes it. A BundleError (bad input, exit 2,
    # no systemd restart loop), not an EngineError (exit 1), and one line naming the file.
    import re

    from onnx import TensorProto, helper, save

    from conftest import unloadable_graph_bundle
    from inspector.engines.onnxruntime import OnnxRuntimeEngine
    for how, says in (("truncated", "INVALID_PROTOBUF: Protobuf parsing failed"),
                      ("opset", "Opset 99")):
        b = unloadable_graph_bundle(toy_bundle, tmp_path / how, how)
        load_bundle(b)  # the recorded hash matches
        with pytest.raises(BundleError) as err:
            OnnxRuntimeEngine(b / "model.onnx")
        msg = str(err.value)
        assert msg.startswith(f"{b / 'model.onnx'}: onnxruntime ") and says in msg, msg
        assert "\n" not in msg and "onnxruntime_src" not in msg, msg  # one line, no C++ source place
    # an operator type no provider implements (found when the session is set up, not at parsing)
    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [1, 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    graph = tmp_path / "bf16.onnx"
    save(model, str(graph))
    with pytest.raises(BundleError, match=rf"^{re.escape(str(graph))}: onnxruntime .*NOT_IMPLEMENTED.*Relu"):
        OnnxRuntimeEngine(graph)


@pytest.mark.parametrize("error, text", [
    ("RuntimeException", "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Exception during initialization: "
                         "/onnxruntime_src/onnxruntime/core/providers/cuda/cuda_call.cc:123 std::conditional_t"
                         "<THRW, void, common::Status> onnxruntime::CudaCall(ERRTYPE, const char*, const "
                         "char*, SUCCTYPE, const char*, const char*, int) CUDA failure 100: no "
                         "CUDA-capable device is detected ; GPU=0 ; hostname=ipc ; expr=cudaSetDevice(info_.device_id);"),
    ("Fail", "[ONNXRuntimeError] : 1 : FAIL : Failed to load library libonnxruntime_providers_cuda.so "
             "with error: libcublasLt.so.12: cannot open shared object file: No such file or directory"),
    ("EPFail", "[ONNXRuntimeError] : 11 : EP_FAIL : TensorRT EP failed to create engine from network"),
], ids=["cuda-device", "cuda-library", "tensorrt-ep"])
def test_a_provider_or_device_failure_stays_an_engine_error(toy_bundle, monkeypatch, error, text):
    # A GPU that is missing or broken may be there after a restart (exit 1): only the session
    # creation is stood in for, as no GPU is here; the exception types are onnxruntime's own.
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    from inspector.engines.onnxruntime import OnnxRuntimeEngine
    from inspector.errors import EngineError

    def fails(*a, **k):
        raise getattr(C, error)(text)
    monkeypatch.setattr(ort, "InferenceSession", fails)
    with pytest.raises(EngineError) as err:
        OnnxRuntimeEngine(toy_bundle / "model.onnx")
    assert not isinstance(err.value, BundleError)
    assert str(err.value).startswith(f"{toy_bundle / 'model.onnx'}: onnxruntime could not load the graph")
    assert text.split(" : ")[-1][:30] in str(err.value)


def test_missing_graph_and_missing_yaml(toy_bundle, tmp_path):
    b = copy(toy_bundle, tmp_path / "b")
    (b / "model.onnx").unlink()
    with pytest.raises(BundleError, match="model.onnx.*missing"):
        load_bundle(b)
    (b / "bundle.yaml").unlink()
    with pytest.raises(BundleError, match="bundle.yaml: missing"):
        load_bundle(b)
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nowhere")


def test_bad_key_in_bundle_yaml_is_named(toy_bundle, tmp_path):
    b = copy(toy_bundle, tmp_path / "b")
    meta = yaml.safe_load((b / "bundle.yaml").read_text())
    meta["input"]["channels"] = 2
    (b / "bundle.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(BundleError, match="input.channels"):
        load_bundle(b)


def test_write_bundle_cut_short_by_a_full_disk_keeps_the_old_file(toy_bundle, tmp_path):
    """A write that fails part-way (here a file-size limit standing in for a full disk) must leave
    the previous bundle.yaml, not a truncated one that still parses with keys missing."""
    import subprocess
    import sys
    import textwrap

    b = copy(toy_bundle, tmp_path / "b")
    before = (b / "bundle.yaml").read_bytes()
    limit = len(before) + 512  # the old file fits, the new one (long provenance) does not
    child = textwrap.dedent(f"""
        import resource, signal, sys
        from inspector.bundle import load_bundle, write_bundle
        spec = load_bundle({str(b)!r}).spec
        spec = spec.model_copy(update={{"provenance": {{**spec.provenance, "note": "x" * 20000}},
                                        "kind_params": {{"kept": 1}}}})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))
        try:
            write_bundle({str(b)!r}, spec)
        except OSError as e:
            print("failed:", e)
            sys.exit(3)
    """)
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert (b / "bundle.yaml").read_bytes() == before
    assert load_bundle(b).spec.provenance == yaml.safe_load(before).get("provenance", {})
    assert sorted(p.name for p in b.iterdir() if p.name.endswith(".tmp")) == []


def test_write_bundle_replaces_the_file_and_keeps_its_mode(toy_bundle, tmp_path):
    from inspector.bundle import write_bundle

    b = copy(toy_bundle, tmp_path / "b")
    (b / "bundle.yaml").chmod(0o644)
    spec = load_bundle(b).spec
    write_bundle(b, spec.model_copy(update={"kind_params": {"m": 0.5}}))
    assert load_bundle(b).spec.kind_params == {"m": 0.5}
    assert (b / "bundle.yaml").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in b.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("section, key, value, error", [
    ("tiling", "overlap", 128, r"bundle.yaml: .*tiling.overlap=128 must be smaller than the tile \(input.tile \[128, 128\]\)"),
    ("tiling", "overlap", 5000, r"bundle.yaml: .*tiling.overlap=5000 must be smaller"),
    ("tiling", "overlap", -1, r"bundle.yaml: tiling.overlap: .*greater than or equal to 0"),
    ("input", "tile", [0, -5], r"bundle.yaml: input.tile.0: .*greater than or equal to 1"),
    ("input", "tile", [128, 0], r"bundle.yaml: input.tile.1: .*greater than or equal to 1"),
])
def test_tiling_that_cannot_cut_frames_is_refused_naming_the_key(toy_bundle, tmp_path, section, key, value, error):
    # overlap >= tile used to load and then cut a 256x1600 frame into 1345 tiles at stride 1
    b = copy(toy_bundle, tmp_path / "b")
    meta = yaml.safe_load((b / "bundle.yaml").read_text())
    meta.setdefault(section, {})[key] = value
    (b / "bundle.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(BundleError, match=error):
        load_bundle(b)


def test_largest_overlap_loads_and_a_defaulted_overlap_fits_small_tiles(toy_bundle, tmp_path):
    from inspector.bundle import BundleSpec, InputSpec, TilingSpec

    b = copy(toy_bundle, tmp_path / "b")
    meta = yaml.safe_load((b / "bundle.yaml").read_text())
    meta["tiling"] = {"overlap": 127}  # the toy bundle's tiles are 128
    (b / "bundle.yaml").write_text(yaml.safe_dump(meta))
    assert load_bundle(b).spec.tiling.overlap == 127
    # a spec that never set the overlap keeps the default (32) where it fits, and otherwise gets
    # the largest its tiles allow; one that set it explicitly is held to it
    spec = load_bundle(b).spec.model_dump()
    del spec["tiling"]
    assert BundleSpec.model_validate(spec).tiling.overlap == 32
    spec["input"]["tile"] = [16, 24]
    assert BundleSpec.model_validate(spec).tiling.overlap == 15
    with pytest.raises(ValueError, match=r"tiling.overlap=32 must be smaller"):
        BundleSpec.model_validate({**spec, "tiling": TilingSpec(overlap=32)})
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        InputSpec(tile=(0, -5))


def test_a_cross_section_error_is_one_clean_line_without_pydantics_prefix(toy_bundle, tmp_path):
    b = copy(toy_bundle, tmp_path / "b")
    meta = yaml.safe_load((b / "bundle.yaml").read_text())
    meta["tiling"] = {"overlap": 256}  # the toy bundle's tiles are 128
    (b / "bundle.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(BundleError) as ei:
        load_bundle(b)
    msg = str(ei.value)
    assert "Value error" not in msg
    assert msg.startswith(f"{b / 'bundle.yaml'}: tiling.overlap=256 must be smaller")
    assert "\n" not in msg


def test_a_yaml_syntax_error_in_bundle_yaml_is_one_line_with_line_and_column(toy_bundle, tmp_path):
    b = copy(toy_bundle, tmp_path / "b")
    text = (b / "bundle.yaml").read_text().splitlines()
    text.insert(2, "broken: [1, 2")  # an unclosed flow sequence on line 3
    (b / "bundle.yaml").write_text("\n".join(text) + "\n")
    with pytest.raises(BundleError) as ei:
        load_bundle(b)
    msg = str(ei.value)
    assert "\n" not in msg, msg
    assert msg.startswith(f"{b / 'bundle.yaml'}: not valid YAML at line ")
    assert "<unicode string>" not in msg and "^" not in msg
    # the CLI prints it as the one line of an exit-2 error
    from conftest import run_cli
    r = run_cli("evaluate", "--bundle", str(b), "--format", "folder", "--data", str(tmp_path))
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == [f"inspector: error: {msg}"], r.stderr


# -- a load step cut short by memory or the system is not a bad graph (review 19 #3)

#: in a fresh interpreter: import everything, then cap the address space a little above what is
#: mapped already (RLIMIT_AS: a real allocation failure, as on a line PC short of memory), load
#: the graph, lift the cap and load it again (what a restart does)
_LOAD_UNDER_A_CAP = r"""
import json, os, resource, sys
import onnxruntime
from inspector.engines.onnxruntime import OnnxRuntimeConfig, OnnxRuntimeEngine
from inspector.errors import BundleError, EngineError
graph, extra = sys.argv[1], int(sys.argv[2]) << 20
cfg = OnnxRuntimeConfig(intra_op_threads=1)
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
mapped = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
resource.setrlimit(resource.RLIMIT_AS, (mapped + extra, hard))
try:
    OnnxRuntimeEngine(graph, cfg)
    out = {"error": None}
except (BundleError, EngineError) as e:
    out = {"error": type(e).__name__, "message": str(e), "onnxruntime": str(e.__context__)}
resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
OnnxRuntimeEngine(graph, cfg)  # memory back: the same bytes load
out["after"] = "loaded"
print(json.dumps(out))
"""


def _big_graph(path: Path, mib: int = 64) -> Path:
    """A valid graph with a ``mib`` MiB weight: y = x + mean(W)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros((mib, 256, 1024), np.float32), "W")
    nodes = [helper.make_node("ReduceMean", ["W"], ["m"], keepdims=0),
             helper.make_node("Add", ["x", "m"], ["y"])]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_out_of_memory_while_onnxruntime_reads_a_valid_graph_is_an_engine_error(tmp_path):
    # 32 MiB of room for a 64 MiB graph: onnxruntime's read of the file fails with std::bad_alloc
    # under "Load model from ... failed:" (the case that was exit 2, never restarted)
    graph = _big_graph(tmp_path / "big.onnx")
    p = subprocess.run([sys.executable, "-c", _LOAD_UNDER_A_CAP, str(graph), "32"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["error"] is not None, "the graph loaded under the cap: nothing was tested"
    assert out["onnxruntime"].startswith("[ONNXRuntimeError] : 1 : FAIL : Load model from ") \
        and out["onnxruntime"].endswith("failed:std::bad_alloc"), out  # the load step, as in r13
    assert out["error"] == "EngineError", out  # exit 1: systemd restarts it
    assert out["message"].startswith(
        f"{graph}: onnxruntime could not load the graph: FAIL: std::bad_alloc"), out
    assert "not a bad graph" in out["message"], out
    assert out["after"] == "loaded"


#: onnxruntime's messages: the first two and "system error number 13" as it raised them in the
#: review (r13_oom_load.out, r13_unreadable.out); ENOMEM / EIO as its file read reports any errno
#: (``system error number <errno>``); its arena's and a provider's out-of-memory wording
_TRANSIENT = [
    ("Fail", "[ONNXRuntimeError] : 1 : FAIL : Load model from {graph} failed:std::bad_alloc"),
    ("RuntimeException", "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Exception during initialization: "
                         "std::bad_alloc"),
    ("Fail", "[ONNXRuntimeError] : 1 : FAIL : Load model from {graph} failed:system error number 12"),
    ("Fail", "[ONNXRuntimeError] : 1 : FAIL : Load model from {graph} failed:system error number 5"),
    ("RuntimeException", "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Exception during initialization: "
                         "/onnxruntime_src/onnxruntime/core/framework/bfc_arena.cc:359 void* onnxruntime::"
                         "BFCArena::AllocateRawInternal(size_t, bool, onnxruntime::Stream*) Failed to "
                         "allocate memory for requested buffer of size 268435456"),
    ("Fail", "[ONNXRuntimeError] : 1 : FAIL : Load model from {graph} failed:CUDA out of memory"),
]


@pytest.mark.parametrize("error, text", _TRANSIENT,
                         ids=["load-bad_alloc", "init-bad_alloc", "ENOMEM", "EIO", "arena", "oom"])
def test_a_memory_or_system_error_at_load_stays_an_engine_error(toy_bundle, monkeypatch, error, text):
    # only the session creation is stood in for (a real shortage is the test above); the
    # exception types are onnxruntime's own
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    from inspector.engines.onnxruntime import OnnxRuntimeEngine

    graph = toy_bundle / "model.onnx"

    def fails(*a, **k):
        raise getattr(C, error)(text.format(graph=graph))
    monkeypatch.setattr(ort, "InferenceSession", fails)
    with pytest.raises(EngineError) as err:
        OnnxRuntimeEngine(graph)
    assert not isinstance(err.value, BundleError)
    msg = str(err.value)
    assert msg.startswith(f"{graph}: onnxruntime could not load the graph: ") and "\n" not in msg, msg
    assert msg.endswith("a memory or system error, not a bad graph"), msg


def test_a_graph_the_service_user_cannot_read_is_a_bundle_error(toy_bundle, monkeypatch):
    # EACCES is the install's fault, like an unreadable config: exit 2, not a restart loop
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    from inspector.engines.onnxruntime import OnnxRuntimeEngine

    graph = toy_bundle / "model.onnx"

    def fails(*a, **k):
        raise C.Fail(f"[ONNXRuntimeError] : 1 : FAIL : Load model from {graph} failed:system error number 13")
    monkeypatch.setattr(ort, "InferenceSession", fails)
    with pytest.raises(BundleError, match=r"system error number 13 \(Permission denied\); the service "
                                          r"runs as its own user: make the graph readable to it"):
        OnnxRuntimeEngine(graph)


def test_more_graphs_onnxruntime_cannot_load_stay_bundle_errors(toy_bundle, tmp_path):
    # real graphs, real sessions: an IR version and an operator this onnxruntime lacks, a file that
    # is no graph at all (the truncated, opset and bf16 cases are above)
    import onnx

    from inspector.engines.onnxruntime import OnnxRuntimeEngine

    model = onnx.load(str(toy_bundle / "model.onnx"))
    model.ir_version = 99
    onnx.save(model, str(tmp_path / "ir.onnx"))
    model = onnx.load(str(toy_bundle / "model.onnx"))
    model.graph.node[0].op_type = "NoSuchOp"
    onnx.save(model, str(tmp_path / "op.onnx"))
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "half.onnx").write_bytes((toy_bundle / "model.onnx").read_bytes()[:300])
    for name, says in (("ir.onnx", "Unsupported model IR version: 99"), ("op.onnx", "NoSuchOp"),
                       ("empty.onnx", "No graph was found"), ("half.onnx", "INVALID_PROTOBUF")):
        with pytest.raises(BundleError) as err:
            OnnxRuntimeEngine(tmp_path / name)
        assert str(err.value).startswith(f"{tmp_path / name}: onnxruntime ") and says in str(err.value)
