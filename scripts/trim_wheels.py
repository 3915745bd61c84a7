"""Trim wheels for the GPU box's device check, where everything carried there must fit in 64 MiB.

Used by scripts/device_wheels.sh (stdlib only; needs `readelf`, from binutils, for the native wheels):

  trim_wheels.py wheel SRC.whl OUT_DIR [--drop GLOB ...] [--keep GLOB ...]
      Rewrite a native wheel without the entries matching a --drop glob, then without every shared library
      under a `*.libs/` folder that nothing kept needs (DT_NEEDED, transitively). --keep globs are never
      pruned (libraries loaded with dlopen, e.g. UCX transports). RECORD is rewritten for what is left.
  trim_wheels.py flashinfer SRC.whl OUT.tar.xz
      FlashInfer 0.7.4 (101 MB wheel, 451 MB unpacked) down to what `import flashinfer` and the JIT of
      batch prefill (fa2, fa3) and batch decode read: every Python module (they are imported at package
      import, and lazily), the dist-info, `data/include`, `data/spdlog`, the csrc sources and Jinja templates
      of those modules, and the #include closure of all that over csrc, CUTLASS/CuTe and CCCL. Kernel sources
      of every other family (moe, mla, gemm, cake_*, ...) are left out. A tar.xz, not a wheel: the Python
      files compress to 11 MB with xz against 24 MB with zip.
  trim_wheels.py verify-flashinfer TREE SRC.whl
      In TREE (the tar.xz unpacked), import flashinfer and generate the JIT specs the engine uses
      (FLASHINFER_CUDA_ARCH_LIST=9.0, so no GPU is needed), recording every file the generators open; then
      walk the #include closure of the generated sources and fail if any include resolves in the full wheel
      but not in TREE. Needs torch, apache-tvm-ffi and nvidia-ml-py importable.
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

_INCLUDE = re.compile(rb'^\s*#\s*include\s*[<"]([^>"]+)[>"]', re.M)
_ELF = b"\x7fELF"

# The csrc entry points of the modules pdserve's FlashInfer backend builds (jit/attention/modules.py:
# gen_batch_prefill_module, _gen_batch_prefill_primary_module, _gen_batch_prefill_independent_paged_module
# for fa2 and fa3, and gen_batch_decode_module). verify-flashinfer checks this list against the generators.
FI_CSRC_ENTRIES = ("batch_prefill*", "batch_decode.cu", "batch_decode_*")
FI_DATA = "flashinfer/data/"
# The include search path of flashinfer/jit/cpp_ext.py (get_cccl_includes + get_system_includes), in its order.
FI_INCLUDE_DIRS = (
    "cccl/cub",
    "cccl/libcudacxx/include",
    "cccl/thrust",
    "include",
    "csrc",
    "cutlass/include",
    "cutlass/tools/util/include",
    "spdlog/include",
)


def _matches(name: str, globs: list[str]) -> bool:
    return any(fnmatch.fnmatch(name, g) for g in globs)


def _needed(path: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=False).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def _prune_unneeded(root: Path, names: list[str], keep: list[str]) -> set[str]:
    """Entries to drop: ELF files under a `*.libs/` folder not reachable through DT_NEEDED from the rest."""
    elves = [n for n in names if (root / n).read_bytes()[:4] == _ELF]
    prunable = {n for n in elves if n.split("/")[0].endswith(".libs") and not _matches(n, keep)}
    by_base: dict[str, list[str]] = {}
    for n in prunable:
        by_base.setdefault(PurePosixPath(n).name, []).append(n)
    reached: set[str] = set()
    todo = [n for n in elves if n not in prunable]
    while todo:
        for lib in _needed(root / todo.pop()):
            for n in by_base.get(lib, []):
                if n not in reached:
                    reached.add(n)
                    todo.append(n)
    return prunable - reached


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def trim_wheel(src: Path, out_dir: Path, drop: list[str], keep: list[str]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(src) as z, tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        infos = [i for i in z.infolist() if not i.is_dir()]
        record = next(i.filename for i in infos if i.filename.endswith(".dist-info/RECORD"))
        kept = [i.filename for i in infos if i.filename != record and not _matches(i.filename, drop)]
        for n in kept:
            z.extract(n, root)
        gone = _prune_unneeded(root, kept, keep)
        kept = [n for n in kept if n not in gone]
        target = out_dir / src.name
        lines = []
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as w:
            for info in infos:
                if info.filename not in kept:
                    continue
                data = (root / info.filename).read_bytes()
                w.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
                lines.append(_record_line(info.filename, data))
            w.writestr(record, "\n".join([*lines, f"{record},,"]) + "\n")
    print(f"{src.name}: {src.stat().st_size / 2**20:.1f} MiB -> {target.stat().st_size / 2**20:.1f} MiB")
    return target


def _resolve(name: str, here: str, files: set[str]) -> str | None:
    for d in (here, *(FI_DATA + inc for inc in FI_INCLUDE_DIRS)):
        cand = os.path.normpath(f"{d}/{name}")
        if cand in files:
            return cand
    return None


def include_closure(start: list[str], read, files: set[str]) -> tuple[set[str], set[str]]:
    """Every file reached from `start` by #include over FlashInfer's search path (all branches of every #if, so
    a superset of what nvcc reads); and the include names that resolve nowhere (system and CUDA headers)."""
    seen: set[str] = set()
    unresolved: set[str] = set()
    todo = list(start)
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        for raw in _INCLUDE.findall(read(f)):
            name = raw.decode(errors="replace")
            hit = _resolve(name, os.path.dirname(f), files)
            if hit is None:
                unresolved.add(name)
            else:
                todo.append(hit)
    return seen, unresolved


def trim_flashinfer(src: Path, out: Path) -> None:
    with zipfile.ZipFile(src) as z:
        names = [i.filename for i in z.infolist() if not i.is_dir()]
        files = set(names)
        csrc = [n for n in names if n.startswith(FI_DATA + "csrc/") and n.count("/") == 3]
        entries = [n for n in csrc if _matches(PurePosixPath(n).name, list(FI_CSRC_ENTRIES))]
        reached, _ = include_closure(entries, z.read, files)

        def wanted(n: str) -> bool:
            if not n.startswith("flashinfer/"):
                return True  # dist-info, the small top-level helper modules
            if n.startswith((FI_DATA + "include/", FI_DATA + "spdlog/")):
                return True
            if n.startswith(FI_DATA):
                return n in reached
            return n.endswith((".py", "py.typed"))

        kept = [n for n in names if wanted(n)]
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".partial")
        with tarfile.open(tmp, "w:xz", preset=9) as t:
            for n in kept:
                data = z.read(n)
                info = tarfile.TarInfo(n)
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                t.addfile(info, io.BytesIO(data))
        tmp.replace(out)
    print(
        f"{src.name}: {len(names)} files -> {len(kept)}; {src.stat().st_size / 2**20:.1f} MiB -> "
        f"{out.name} {out.stat().st_size / 2**20:.1f} MiB"
    )


_SPEC_PROBE = r"""
import json, os, sys
opened = set()
sys.addaudithook(lambda ev, a: opened.add(os.path.abspath(a[0])) if ev == "open" and isinstance(a[0], str) else None)
import torch, flashinfer
from flashinfer.jit.attention import modules as m
specs = []
for dt in (torch.float16, torch.bfloat16):
    for hd in (64, 128):
        for swa in (False, True):
            args = (dt, dt, dt, torch.int32, hd, hd, 0, swa, False, False)
            specs.append(m._gen_batch_prefill_primary_module("fa2", *args))
            specs.append(m._gen_batch_prefill_independent_paged_module("fa2", *args))
            specs.append(m.gen_batch_prefill_module("fa3", *args))
            specs.append(m.gen_batch_decode_module(*args[:-1]))
print(json.dumps({"pkg": os.path.dirname(flashinfer.__file__), "opened": sorted(opened),
                  "sources": sorted({str(p) for s in specs for p in s.sources}),
                  "extra_includes": sorted({str(p) for s in specs for p in (s.extra_include_dirs or [])})}))
"""


def verify_flashinfer(tree: Path, src: Path) -> int:
    path = f"{tree}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    env = dict(os.environ, FLASHINFER_CUDA_ARCH_LIST="9.0", PYTHONPATH=path)
    with tempfile.TemporaryDirectory() as ws:
        env["FLASHINFER_WORKSPACE_BASE"] = ws
        run = subprocess.run([sys.executable, "-c", _SPEC_PROBE], env=env, capture_output=True, text=True, check=False)
        if run.returncode != 0:
            print(f"FAIL: import flashinfer / JIT spec generation in {tree}:\n{run.stderr[-4000:]}")
            return 1
        probe = json.loads(run.stdout.strip().splitlines()[-1])
        pkg = Path(probe["pkg"]).resolve()
        if not pkg.is_relative_to(tree.resolve()):
            print(f"FAIL: flashinfer was imported from {pkg}, not from {tree}")
            return 1
        if probe["extra_includes"]:
            print(f"FAIL: specs name extra include dirs this check does not follow: {probe['extra_includes']}")
            return 1
        csrc_read = sorted(p for p in probe["opened"] if p.startswith(str(pkg / "data")))
        # Generated sources live in the workspace; include resolution runs on tree-relative names.
        tree_files = {str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file()}
        sources = probe["sources"]

        def read(name: str) -> bytes:
            return Path(name if os.path.isabs(name) else tree / name).read_bytes()

        generated = {str(p) for p in Path(ws).rglob("*") if p.is_file()}
        _, unresolved = include_closure(sources, read, tree_files | generated)
        with zipfile.ZipFile(src) as z:
            full = {n for n in z.namelist() if n.startswith(FI_DATA)}

            def read_full(name: str) -> bytes:
                return Path(name).read_bytes() if os.path.isabs(name) else z.read(name)

            _, unresolved_full = include_closure(sources, read_full, full | generated)
    lost = sorted(unresolved - unresolved_full)
    print(f"flashinfer trim: {len(sources)} JIT sources, {len(csrc_read)} package data files read by the generators")
    if lost:
        print(f"FAIL: includes found in the full wheel but missing from the trimmed tree: {lost[:20]}")
        return 1
    print("verify: ok (import flashinfer, fa2/fa3 prefill + decode JIT specs, every include resolves)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wheel")
    w.add_argument("src", type=Path)
    w.add_argument("out_dir", type=Path)
    w.add_argument("--drop", action="append", default=[])
    w.add_argument("--keep", action="append", default=[])
    f = sub.add_parser("flashinfer")
    f.add_argument("src", type=Path)
    f.add_argument("out", type=Path)
    v = sub.add_parser("verify-flashinfer")
    v.add_argument("tree", type=Path)
    v.add_argument("src", type=Path)
    a = ap.parse_args(argv)
    if a.cmd == "wheel":
        trim_wheel(a.src, a.out_dir, a.drop, a.keep)
        return 0
    if a.cmd == "flashinfer":
        trim_flashinfer(a.src, a.out)
        return 0
    return verify_flashinfer(a.tree, a.src)


if __name__ == "__main__":
    sys.exit(main())
