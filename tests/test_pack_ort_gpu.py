"""benchmarks/pack_ort_gpu.py and gpu_check.sh --ort-parts: onnxruntime-gpu carried in parts.

The fatbin surgery is checked on hand-built binaries with the container layout CUDA uses; a real
onnxruntime-gpu wheel ran through it on an H100 (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
import struct
import subprocess
import sys
import tarfile
import zipfile

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import pack_ort_gpu as pk  # noqa: E402


def entry(kind: int, arch: int, payload: bytes) -> bytes:
    head = bytearray(64)
    struct.pack_into("<HHIQ", head, 0, kind, 0x0101, len(head), len(payload))
    struct.pack_into("<I", head, pk.ENTRY_ARCH_OFFSET, arch)
    return bytes(head) + payload


def container(*entries: bytes) -> bytes:
    body = b"".join(entries)
    return struct.pack("<IHHQ", pk.FATBIN_MAGIC, 1, 16, len(body)) + body


def fake_library() -> tuple[bytes, dict[str, tuple[int, int]]]:
    """ELF-ish bytes: a stray magic, a container with sm_90 code, one without; payload ranges."""
    parts = [b"\x7fELF" + bytes(60), struct.pack("<I", pk.FATBIN_MAGIC) + b"\x07\x00junk", bytes(8)]
    payloads = {"a80": b"\x80" * 40, "a90": b"\x90" * 48, "a90ptx": b"P" * 24, "a120": b"\x12" * 32,
                "b75": b"\x75" * 16, "b80": b"\x08" * 20}
    parts.append(container(entry(2, 80, payloads["a80"]), entry(2, 90, payloads["a90"]),
                           entry(1, 90, payloads["a90ptx"]), entry(2, 120, payloads["a120"])))
    parts.append(b"\x00text between\x00")
    parts.append(container(entry(2, 75, payloads["b75"]), entry(2, 80, payloads["b80"])))
    parts.append(b"tail")
    data = b"".join(parts)
    where = {k: (data.index(v), len(v)) for k, v in payloads.items()}
    return data, where


def test_keep_only_sm_zeroes_foreign_code_only_where_the_target_has_its_own():
    data, where = fake_library()
    out = bytearray(data)
    stats = pk.keep_only_sm(out, 90)
    assert len(out) == len(data)
    assert stats["containers"] == 2 and stats["with_target"] == 1
    assert stats["archs"] == {"sass_80": 2, "sass_90": 1, "ptx_90": 1, "sass_120": 1, "sass_75": 1}
    zeroed = {"a80", "a120"}
    for k, (off, n) in where.items():
        assert out[off:off + n] == (bytes(n) if k in zeroed else data[off:off + n]), k
    assert stats["zeroed_bytes"] == 40 + 32 and stats["zeroed_entries"] == 2
    # every byte outside the zeroed payloads is untouched (headers, other sections, stray magic)
    mask = bytearray(len(data))
    for k in zeroed:
        off, n = where[k]
        mask[off:off + n] = b"\x01" * n
    assert all(a == b for a, b, m in zip(out, data, mask) if not m)


def test_a_truncated_container_is_left_alone():
    data, _ = fake_library()
    cut = data[:data.index(b"\x90" * 48) + 10]  # the sm_90 payload runs past the end
    out = bytearray(cut)
    assert pk.keep_only_sm(out, 90)["containers"] == 0 and bytes(out) == cut


def fake_wheel(path, library: bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(pk.CUDA_LIBRARY, library)
        z.writestr("onnxruntime/__init__.py", "__version__ = '0.0-test'\n")
        z.writestr("onnxruntime_gpu-0.0.dist-info/METADATA", "Name: onnxruntime-gpu\n")
    return path


def test_pack_writes_parts_that_join_back_to_the_pruned_tree(tmp_path):
    data, where = fake_library()
    wheel = fake_wheel(tmp_path / "onnxruntime_gpu-0.0-cp312-cp312-manylinux_2_28_x86_64.whl", data)
    m = pk.pack(wheel, 90, tmp_path / "out", part_mb=0.0002)  # 200-byte parts
    assert len(m["parts"]) >= 2 and m["parts"][0] == "onnxruntime_gpu-0.0-sm90.tar.xz.part00"
    joined = b"".join((tmp_path / "out" / p).read_bytes() for p in m["parts"])
    assert hashlib.sha256(joined).hexdigest() == m["sha256"]
    assert json.loads((tmp_path / "out" / "onnxruntime_gpu-0.0-sm90.tar.xz.json").read_text()) == m
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(joined))) as t:
        files = {n: t.extractfile(n).read() for n in t.getnames()}
        assert t.getmember(pk.CUDA_LIBRARY).mode & 0o111
    assert files["onnxruntime/__init__.py"] == b"__version__ = '0.0-test'\n"
    lib = files[pk.CUDA_LIBRARY]
    off, n = where["a120"]
    assert lib[off:off + n] == bytes(n)
    off, n = where["a90"]
    assert lib[off:off + n] == data[off:off + n]


def test_pack_refuses_a_gpu_the_wheel_has_no_code_for_and_a_wheel_without_cuda(tmp_path):
    data, _ = fake_library()
    wheel = fake_wheel(tmp_path / "onnxruntime_gpu-0.0-cp312-cp312-x.whl", data)
    with pytest.raises(SystemExit, match=r"no SASS for sm_86 .*sass_90"):
        pk.pack(wheel, 86, tmp_path / "out")
    plain = tmp_path / "onnxruntime-0.0-cp312-cp312-x.whl"
    with zipfile.ZipFile(plain, "w") as z:
        z.writestr("onnxruntime/__init__.py", "")
    with pytest.raises(SystemExit, match="not an onnxruntime-gpu wheel"):
        pk.pack(plain, 90, tmp_path / "out")
    truncated = tmp_path / "onnxruntime_gpu-0.0-cp312-cp312-y.whl"
    truncated.write_bytes(wheel.read_bytes()[:100])
    with pytest.raises(SystemExit, match="not a wheel"):
        pk.pack(truncated, 90, tmp_path / "out")


# a CPU rehearsal of GPU-machine tooling (12-18 s): `make test-slow`, before a device run
@pytest.mark.slow
def test_gpu_check_joins_and_unpacks_the_parts_ahead_of_the_cpu_build(tmp_path):
    """The shell side: parts in --ort-parts are joined, unpacked and logged (no GPU needed)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        ti = tarfile.TarInfo("marker_from_parts.txt")
        ti.size = 2
        t.addfile(ti, io.BytesIO(b"ok"))
    packed = lzma.compress(buf.getvalue())
    parts = tmp_path / "parts"
    parts.mkdir()
    half = len(packed) // 2
    (parts / "onnxruntime_gpu-0.0-sm90.tar.xz.part00").write_bytes(packed[:half])
    (parts / "onnxruntime_gpu-0.0-sm90.tar.xz.part01").write_bytes(packed[half:])
    site = tmp_path / "ort-site"
    env = {**os.environ, "PYTHON": sys.executable, "ORT_GPU_SITE": str(site)}
    env.pop("OUT", None)
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--out", str(tmp_path / "gc"), "--no-thesis",
                        "--wheels", str(tmp_path / "no-wheels"), "--ort-parts", str(parts),
                        "--backends", "ort-cpu", "--budget-s", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (site / "marker_from_parts.txt").read_text() == "ok"
    res = json.loads((tmp_path / "gc" / "gpu_check.json").read_text())
    assert f"-> {site}" in res["install_log"]
    # a missing part: the run goes on without it and says so
    (parts / "onnxruntime_gpu-0.0-sm90.tar.xz.part01").unlink()
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--out", str(tmp_path / "gc2"), "--no-thesis",
                        "--wheels", str(tmp_path / "no-wheels"), "--ort-parts", str(parts),
                        "--backends", "ort-cpu", "--budget-s", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0 and "could not unpack" in r.stderr
    # a folder without parts: said, not silently ignored
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--out", str(tmp_path / "gc3"), "--no-thesis",
                        "--wheels", str(tmp_path / "no-wheels"), "--ort-parts", str(tmp_path / "gc"),
                        "--backends", "ort-cpu", "--budget-s", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0 and "no onnxruntime_gpu-*.tar.xz.part00 there" in r.stderr
