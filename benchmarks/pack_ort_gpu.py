"""Pack onnxruntime-gpu small enough to carry to a GPU machine that has no package registry.

The onnxruntime-gpu wheel (1.31: 244 MB) is mostly ``libonnxruntime_providers_cuda.so``, whose
CUDA kernels are compiled for six GPU generations. A machine with one GPU loads only the SASS of
its own architecture. This tool unpacks the wheel, zeroes the SASS of every other architecture in
each fatbin container that holds code for the target (containers without it stay whole, so
nothing the GPU might need is lost), and writes an xz tarball split into parts that fit a
size-limited transfer (for the 1.31.1 wheel and sm_90: 70 MB, in two parts of 40 and 30 MB).
``benchmarks/gpu_check.sh --ort-parts DIR`` joins and unpacks the parts on the GPU machine.

    python benchmarks/pack_ort_gpu.py --version 1.31.1 --sm 90 --out .whl/ort-gpu    # downloads
    python benchmarks/pack_ort_gpu.py --wheel onnxruntime_gpu-1.31.1-....whl --sm 90 --out DIR

Only a byte range inside each foreign entry is zeroed: the ELF file, its sections and every fatbin
header keep their sizes and offsets.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50
_MAGIC_BYTES = struct.pack("<I", FATBIN_MAGIC)
CONTAINER_HEADER = struct.Struct("<IHHQ")    # magic, version, header size, size of the entries
ENTRY_HEADER = struct.Struct("<HHIQ")        # kind (1 PTX, 2 ELF/SASS), ?, header size, payload size
ENTRY_ARCH_OFFSET = 28                       # u32 SM number (90 = sm_90) inside the entry header
KIND_NAMES = {1: "ptx", 2: "sass"}
CUDA_LIBRARY = "onnxruntime/capi/libonnxruntime_providers_cuda.so"


@dataclass
class FatbinEntry:
    kind: int
    arch: int
    payload_offset: int
    payload_size: int


def fatbin_containers(data: bytes | bytearray) -> list[list[FatbinEntry]]:
    """Every fatbin container in a binary, as its list of entries."""
    found: list[list[FatbinEntry]] = []
    pos = 0
    while True:
        i = data.find(_MAGIC_BYTES, pos)
        if i < 0 or i + CONTAINER_HEADER.size > len(data):
            return found
        _, version, header_size, size = CONTAINER_HEADER.unpack_from(data, i)
        end = i + header_size + size
        if version != 1 or header_size != CONTAINER_HEADER.size or end > len(data):
            pos = i + 4  # the magic's bytes inside code or data, not a container
            continue
        entries: list[FatbinEntry] = []
        e = i + header_size
        ok = True
        while e < end:
            if e + ENTRY_ARCH_OFFSET + 4 > end:
                ok = False
                break
            kind, _, ehs, psz = ENTRY_HEADER.unpack_from(data, e)
            arch = struct.unpack_from("<I", data, e + ENTRY_ARCH_OFFSET)[0]
            if ehs < ENTRY_ARCH_OFFSET + 4 or e + ehs + psz > end:
                ok = False
                break
            entries.append(FatbinEntry(kind, arch, e + ehs, psz))
            e += ehs + psz
        if ok:
            found.append(entries)
            pos = end
        else:
            pos = i + 4


def keep_only_sm(data: bytearray, sm: int) -> dict:
    """Zero the payload of every entry not for ``sm`` in containers that hold SASS for ``sm``."""
    stats = {"containers": 0, "with_target": 0, "zeroed_entries": 0, "zeroed_bytes": 0,
             "kept_bytes": 0, "archs": {}}
    for entries in fatbin_containers(data):
        stats["containers"] += 1
        for en in entries:
            key = f"{KIND_NAMES.get(en.kind, en.kind)}_{en.arch}"
            stats["archs"][key] = stats["archs"].get(key, 0) + 1
        if not any(en.kind == 2 and en.arch == sm for en in entries):
            continue
        stats["with_target"] += 1
        for en in entries:
            if en.arch == sm:
                stats["kept_bytes"] += en.payload_size
                continue
            data[en.payload_offset:en.payload_offset + en.payload_size] = bytes(en.payload_size)
            stats["zeroed_entries"] += 1
            stats["zeroed_bytes"] += en.payload_size
    return stats


def download_wheel(version: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
           "--platform", "manylinux_2_27_x86_64", "-d", str(dest), f"onnxruntime-gpu=={version}"]
    subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob(f"onnxruntime_gpu-{version}-*.whl"))
    if not wheels:
        raise SystemExit(f"pip left no onnxruntime_gpu-{version} wheel in {dest}")
    return wheels[-1]


def pack(wheel: Path, sm: int, out: Path, part_mb: float = 40.0, preset: int = 6) -> dict:
    """Write ``out/<wheel stem>-sm<sm>.tar.xz.partNN`` and a manifest; return the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    stats = None
    if not zipfile.is_zipfile(wheel):
        raise SystemExit(f"{wheel}: not a wheel (no zip archive); download it again")
    with zipfile.ZipFile(wheel) as z, tarfile.open(fileobj=buf, mode="w") as tar:
        for info in z.infolist():
            if info.is_dir():
                continue
            data = bytearray(z.read(info))
            if info.filename == CUDA_LIBRARY:
                stats = keep_only_sm(data, sm)
            ti = tarfile.TarInfo(info.filename)
            ti.size = len(data)
            ti.mode = 0o755 if info.filename.endswith(".so") or ".so." in info.filename else 0o644
            tar.addfile(ti, io.BytesIO(bytes(data)))
    if stats is None:
        raise SystemExit(f"{wheel}: no {CUDA_LIBRARY} in it: not an onnxruntime-gpu wheel")
    if stats["with_target"] == 0:
        raise SystemExit(f"{wheel}: no SASS for sm_{sm} in {CUDA_LIBRARY} (it has "
                         f"{sorted(stats['archs'])}); pick one of those SM numbers")
    packed = lzma.compress(buf.getvalue(), preset=preset)
    stem = f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}-sm{sm}.tar.xz"
    for old in out.glob(f"{stem}.part*"):
        old.unlink()
    step = int(part_mb * 1e6)
    parts = []
    for n, s in enumerate(range(0, len(packed), step)):
        p = out / f"{stem}.part{n:02d}"
        p.write_bytes(packed[s:s + step])
        parts.append(p.name)
    manifest = {"wheel": wheel.name, "sm": sm, "tar_xz_bytes": len(packed),
                "sha256": hashlib.sha256(packed).hexdigest(), "parts": parts, "fatbin": stats}
    (out / f"{stem}.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--wheel", help="an onnxruntime-gpu wheel already downloaded")
    src.add_argument("--version", help="download this onnxruntime-gpu version (cp312, manylinux x86-64)")
    ap.add_argument("--sm", type=int, required=True, help="the GPU's SM number: 90 for H100/H200, 80 A100, 89 L4")
    ap.add_argument("--out", required=True, help="folder for the parts and their manifest")
    ap.add_argument("--part-mb", type=float, default=40.0, help="size of one part, MB (default 40)")
    args = ap.parse_args(argv)
    if args.part_mb <= 0:
        ap.error(f"--part-mb must be > 0, got {args.part_mb}")
    wheel = Path(args.wheel) if args.wheel else download_wheel(args.version, Path(tempfile.mkdtemp()))
    if not wheel.is_file():
        ap.error(f"--wheel {wheel}: no such file")
    m = pack(wheel, args.sm, Path(args.out), args.part_mb)
    print(json.dumps({k: m[k] for k in ("wheel", "sm", "tar_xz_bytes", "parts")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
