"""Build and load heron's small C kernels: gcc on first use, cached, loaded with ctypes.

A library is built once per (source, flags, CPU) into `cache_dir()/kernels`, under
a name that hashes all three (the source with the local headers it includes), so an edited source recompiles and a cache shared
between machines never serves a foreign build. Each build goes to a private
temporary name first and is renamed into place: concurrent processes never load
half a file.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Callable

from heron import envs
from heron.logger import get_logger

logger = get_logger(__name__)

# Tried in order: tuned for this CPU first, then a portable build (e.g. a gcc that
# does not know this CPU).
FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11", "-Wno-psabi"],
    ["-O3", "-fopenmp", "-fPIC", "-shared", "-std=gnu11", "-Wno-psabi"],
)


def cpu_fingerprint() -> str:
    """What -march=native depends on."""
    lines: list[str] = []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU implementer", "CPU part"):
                    if line not in lines:
                        lines.append(line)
                if key == "" and lines:      # the first processor's block is enough
                    break
    except OSError:
        pass
    return platform.machine() + "".join(lines)


_LOCAL_INCLUDE = re.compile(rb'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


def source_bytes(source: Path) -> bytes:
    """The source with the headers it includes from its own folder (`#include "x.h"`),
    so that editing a shared header rebuilds every library that uses it."""
    text = source.read_bytes()
    headers = [source.parent / name.decode() for name in _LOCAL_INCLUDE.findall(text)]
    return text + b"".join(h.read_bytes() for h in headers if h.is_file())


def library_path(source: Path, flags: list[str]) -> Path:
    """Where the build of `source` with these flags for this CPU lives."""
    digest = hashlib.sha256(source_bytes(source) + " ".join(flags).encode()
                            + cpu_fingerprint().encode())
    return envs.cache_dir() / "kernels" / f"{source.stem}-{digest.hexdigest()[:16]}.so"


def compile_library(compiler: str, source: Path, flags: list[str]) -> Path:
    """The shared library for these flags, built once per source, flag and CPU hash."""
    target = library_path(source, flags)
    if target.exists():
        return target
    logger.info("compiling %s into %s (once per source and flags)", source.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        result = subprocess.run([compiler, *flags, "-o", str(tmp), str(source), "-lm"],
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed ({result.returncode}): {result.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def load_library(source: Path, declare: Callable[[ctypes.CDLL], None],
                 flag_sets: tuple[list[str], ...] = FLAG_SETS) -> tuple[ctypes.CDLL | None, str]:
    """(library, "") or (None, why not). `declare` sets the functions' ctypes signatures."""
    compiler = shutil.which("gcc")
    if compiler is None:
        return None, "gcc not found on PATH"
    errors = []
    for flags in flag_sets:
        try:
            lib = ctypes.CDLL(str(compile_library(compiler, source, flags)))
            declare(lib)
            return lib, ""
        except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
            errors.append(str(e))
    return None, f"compiling {source.name} failed: " + " | ".join(errors)
