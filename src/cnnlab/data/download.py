"""Resumable, checksummed downloads and safe extraction.

The archive streams into `NAME.part`; after a cut connection it resumes with an HTTP Range request
(automatically, and again when the command is rerun). It becomes `NAME` only once its size (and
SHA-256 when known) check out, so a complete-looking file is a complete file. A resume sends the
server's validator (If-Range) kept beside the `.part`, so a file changed on the server is fetched whole
again, never spliced. Extraction refuses members that would land outside the destination, never
overwrites a file it did not write, and a rerun skips an extraction of the same archive (by content).
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import socket
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import DataError
from ..io import atomic_write_json, atomic_write_text, sha256_of

CHUNK = 1 << 20


@dataclass(frozen=True)
class Dataset:
    url: str
    folder: str  # what the archive unpacks to: FOLDER/train and FOLDER/val
    sha256: str | None = None  # None: the publisher gives none; the size from the server is checked


DATASETS = {
    "inaturalist-12k": Dataset("https://storage.googleapis.com/wandb_datasets/nature_12K.zip", "inaturalist_12K"),
}


@dataclass(frozen=True)
class PartInfo:
    """What a `.part` file is a prefix of, kept beside it in `.part.json`: a resume asks the server for the
    rest only if its file is still this one (If-Range), and the whole is checked against `total`."""
    url: str
    validator: str | None  # a strong ETag, else Last-Modified; None when the server sends neither
    total: int | None

    @classmethod
    def read(cls, path: Path) -> "PartInfo | None":
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    @classmethod
    def of_response(cls, url: str, resp: http.client.HTTPResponse, total: int | None) -> "PartInfo":
        etag = resp.headers.get("ETag")
        strong = etag if etag and not etag.startswith("W/") else None  # If-Range takes strong validators only
        return cls(url, strong or resp.headers.get("Last-Modified"), total)


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total) of a Content-Range header; None where absent or '*'."""
    m = re.match(r"bytes (?:(\d+)-\d+|\*)/(\d+|\*)", value or "")
    if not m:
        return None, None
    return (int(m.group(1)) if m.group(1) else None), (int(m.group(2)) if m.group(2) != "*" else None)


class _StartOver(Exception):
    """The .part is not a prefix of the server's file (it changed, or the .part is longer): fetch it whole."""


def _receive(resp: http.client.HTTPResponse, url: str, part: Path, info_path: Path, have: int,
             info: PartInfo | None, progress: bool, desc: str) -> None:
    """Append the response body to `part` (or write it afresh), checking it continues what is there."""
    from tqdm.auto import tqdm

    if have and resp.status == 200:  # the server's file changed (If-Range failed) or it ignores Range
        have = 0
    if have:
        first, total = _content_range(resp.headers.get("Content-Range"))
        if first != have:
            raise DataError(f"{url}: the server answered a resume request with a wrong range "
                            f"({resp.headers.get('Content-Range')})")
        if info is not None and info.total is not None and total != info.total:
            raise _StartOver  # a server that ignores If-Range, serving another file of another size
    else:
        length = resp.headers.get("Content-Length")
        total = int(length) if length is not None else None
        atomic_write_json(info_path, asdict(PartInfo.of_response(url, resp, total)))
    with open(part, "ab" if have else "wb") as out, \
            tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                 disable=not progress, dynamic_ncols=True) as bar:
        while block := resp.read(CHUNK):
            out.write(block)
            bar.update(len(block))
    size = part.stat().st_size
    if total is not None and size != total:
        raise http.client.IncompleteRead(b"", total - size)


def _finished_by_416(error: urllib.error.HTTPError, have: int, info: PartInfo | None) -> bool:
    """A 416 to `Range: bytes=have-` means 'nothing left' only if the server's file is exactly `have` long
    and is the file the .part was started from; a longer .part of an older file is not complete."""
    _, total = _content_range(error.headers.get("Content-Range") if error.headers else None)
    expected = info.total if info is not None else None
    return total == have and expected in (None, have)


def download(url: str, dest: str | Path, sha256: str | None = None, retries: int = 5, timeout: float = 30.0,
             progress: bool = True, backoff: float = 1.0) -> Path:
    """Download `url` to `dest`, resuming `dest.part` when present and still a prefix of the server's file;
    return `dest`. The result is renamed into place only after its size (and SHA-256 when given) check out."""
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    info_path = dest.with_name(dest.name + ".part.json")
    failures = 0
    while True:
        info = PartInfo.read(info_path) if part.exists() else None
        if part.exists() and (info is None or info.url != url):
            part.unlink()  # of unknown origin: a resume could splice two files together
        have = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": "cnnlab"}
        if have:
            headers["Range"] = f"bytes={have}-"
            if info is not None and info.validator:
                headers["If-Range"] = info.validator
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
                _receive(resp, url, part, info_path, have, info, progress, dest.name)
            break
        except _StartOver:
            part.unlink()
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:
                if _finished_by_416(e, have, info):
                    break
                part.unlink()  # longer than the server's file: not a prefix of it
                continue
            if e.code >= 500 and failures < retries:
                failures += 1
                time.sleep(backoff * failures)
                continue
            raise DataError(f"{url}: HTTP {e.code} {e.reason}; check the address (--url)") from None
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError) as e:
            failures += 1
            if failures > retries:
                reason = getattr(e, "reason", None) or e
                raise DataError(f"{url}: download interrupted ({reason}); {part.stat().st_size if part.exists() else 0:,} "
                                f"bytes kept in {part}: rerun the same command to resume") from None
            time.sleep(backoff * failures)
    verify(part, PartInfo.read(info_path), sha256, dest.name)
    part.replace(dest)
    info_path.unlink(missing_ok=True)
    return dest


def verify(part: Path, info: PartInfo | None, sha256: str | None, name: str) -> None:
    """Size against what the server announced, then the SHA-256: a damaged file is deleted, never renamed."""
    size = part.stat().st_size
    problem = None
    if info is not None and info.total is not None and size != info.total:
        problem = f"is {size:,} bytes where the server announced {info.total:,}"
    elif sha256 and (actual := sha256_of(part)) != sha256.lower():
        problem = f"has SHA-256 {actual}, not the expected {sha256}"
    if problem:
        part.unlink()
        raise DataError(f"{name} {problem}; the damaged file was deleted, rerun to download it again")


def extract_zip(archive: str | Path, dest: str | Path, progress: bool = True) -> None:
    """Unpack `archive` into `dest`. Refuses any member that would land outside `dest`, and any existing file
    that differs from the member it would be replaced by (a user's own file is never overwritten). A file
    already holding a member's content (CRC-32 and size) is kept: that is how an interrupted extraction
    resumes. The marker `.NAME.extracted` holds the archive's SHA-256 and member count, so a rerun skips a
    complete extraction of this very archive, and unpacks a different archive of the same name."""
    from tqdm.auto import tqdm

    archive, dest = Path(archive), Path(dest)
    marker = dest / f".{archive.name}.extracted"
    root = dest.resolve()
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        raise DataError(f"{archive} is not a valid zip file: delete it and rerun to download it again") from None
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        stamp = f"{sha256_of(archive)} {len(members)}\n"
        if is_extracted(marker, stamp, root, members):
            return
        for m in zf.infolist():
            target = (root / m.filename).resolve()
            if not target.is_relative_to(root) or (m.external_attr >> 16) & 0o170000 == 0o120000:
                raise DataError(f"{archive}: member {m.filename!r} would be written outside {dest} (or is a link); "
                                f"refusing to extract this archive")
        todo = [m for m in members if not holds_member(root / m.filename, m, archive, dest)]
        with tqdm(total=sum(m.file_size for m in todo), unit="B", unit_scale=True, unit_divisor=1024,
                  desc=f"extracting {archive.name}", disable=not progress, dynamic_ncols=True) as bar:
            for m in todo:
                target = root / m.filename
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.cnnlab-tmp")
                with zf.open(m) as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK)
                tmp.replace(target)
                bar.update(m.file_size)
    atomic_write_text(marker, stamp)


def is_extracted(marker: Path, stamp: str, root: Path, members: list[zipfile.ZipInfo]) -> bool:
    """The marker names this archive's content, and every member is there at its size."""
    try:
        if marker.read_text() != stamp:
            return False
    except OSError:
        return False
    return all((p := root / m.filename).is_file() and p.stat().st_size == m.file_size for m in members)


def holds_member(path: Path, member: zipfile.ZipInfo, archive: Path, dest: Path) -> bool:
    """True if `path` already holds the member's content; False if it is absent. A different file there is
    the user's (an extraction writes each member whole, then renames it): refuse rather than overwrite."""
    if not path.exists():
        return False
    if path.is_file() and path.stat().st_size == member.file_size:
        crc = 0
        with open(path, "rb") as fh:
            while block := fh.read(CHUNK):
                crc = zlib.crc32(block, crc)
        if crc == member.CRC:
            return True
    raise DataError(f"{path} already exists and differs from {member.filename} in {archive.name}; cnnlab does not "
                    f"overwrite files it did not write: move it away, or extract into another folder than {dest}")


def fetch_dataset(name: str, dest: str | Path, url: str | None = None, sha256: str | None = None,
                  progress: bool = True, **download_kwargs) -> Path:
    """Download and unpack a known data set into `dest`; return the folder holding train/ and val/."""
    spec = DATASETS[name]
    url = url or spec.url
    dest = Path(dest)
    archive = download(url, dest / Path(url.split("?")[0]).name, sha256 or spec.sha256, progress=progress,
                       **download_kwargs)
    extract_zip(archive, dest, progress)
    for candidate in (dest / spec.folder, *sorted(p for p in dest.iterdir() if p.is_dir())):
        if (candidate / "train").is_dir() and (candidate / "val").is_dir():
            return candidate
    raise DataError(f"{archive} unpacked into {dest}, but no folder there holds train/ and val/")
