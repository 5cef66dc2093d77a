"""Resumable, checksummed downloads and safe extraction.

The archive streams into `NAME.part`; after a cut connection it resumes with an HTTP Range request
(automatically, and again when the command is rerun). It becomes `NAME` only once its size (and
SHA-256 when known) check out, so a complete-looking file is a complete file. Extraction refuses
members that would land outside the destination, and a marker file makes a rerun skip finished work.
"""

from __future__ import annotations

import http.client
import re
import shutil
import socket
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from ..io import atomic_write_text, sha256_of

CHUNK = 1 << 20


@dataclass(frozen=True)
class Dataset:
    url: str
    folder: str  # what the archive unpacks to: FOLDER/train and FOLDER/val
    sha256: str | None = None  # None: the publisher gives none; the size from the server is checked


DATASETS = {
    "inaturalist-12k": Dataset("https://storage.googleapis.com/wandb_datasets/nature_12K.zip", "inaturalist_12K"),
}


def _total_from(resp: http.client.HTTPResponse, have: int) -> int | None:
    if resp.status == 206:
        m = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.headers.get("Content-Range", ""))
        if not m or int(m.group(1)) != have:
            raise DataError(f"the server answered a resume request with a wrong range ({resp.headers.get('Content-Range')})")
        return int(m.group(3)) if m.group(3) != "*" else None
    length = resp.headers.get("Content-Length")
    return int(length) if length is not None else None


def download(url: str, dest: str | Path, sha256: str | None = None, retries: int = 5, timeout: float = 30.0,
             progress: bool = True, backoff: float = 1.0) -> Path:
    """Download `url` to `dest`, resuming `dest.part` when present; return `dest`."""
    from tqdm import tqdm

    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    failures = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": "cnnlab", **({"Range": f"bytes={have}-"} if have else {})}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
                if have and resp.status == 200:  # the server ignores Range: start again
                    have = 0
                total = _total_from(resp, have)
                with open(part, "ab" if have else "wb") as out, \
                        tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                             desc=dest.name, disable=not progress, dynamic_ncols=True) as bar:
                    while block := resp.read(CHUNK):
                        out.write(block)
                        bar.update(len(block))
            size = part.stat().st_size
            if total is not None and size != total:
                raise http.client.IncompleteRead(b"", total - size)
            break
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # nothing left to send: the .part is already whole
                break
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
    if sha256:
        actual = sha256_of(part)
        if actual != sha256.lower():
            part.unlink()
            raise DataError(f"{dest.name}: SHA-256 {actual} does not match the expected {sha256}; "
                            f"the damaged file was deleted, rerun to download it again")
    part.replace(dest)
    return dest


def extract_zip(archive: str | Path, dest: str | Path, progress: bool = True) -> None:
    """Unpack `archive` into `dest`, refusing any member that would land outside `dest`."""
    from tqdm import tqdm

    archive, dest = Path(archive), Path(dest)
    marker = dest / f".{archive.name}.extracted"
    if marker.exists():
        return
    root = dest.resolve()
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        raise DataError(f"{archive} is not a valid zip file: delete it and rerun to download it again") from None
    with zf:
        members = zf.infolist()
        for m in members:
            target = (root / m.filename).resolve()
            if not target.is_relative_to(root) or (m.external_attr >> 16) & 0o170000 == 0o120000:
                raise DataError(f"{archive}: member {m.filename!r} would be written outside {dest} (or is a link); "
                                f"refusing to extract this archive")
        with tqdm(total=sum(m.file_size for m in members), unit="B", unit_scale=True, unit_divisor=1024,
                  desc=f"extracting {archive.name}", disable=not progress, dynamic_ncols=True) as bar:
            for m in members:
                target = root / m.filename
                if m.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                if target.exists() and target.stat().st_size == m.file_size:
                    bar.update(m.file_size)  # left by an interrupted extraction
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.tmp")
                with zf.open(m) as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK)
                tmp.replace(target)
                bar.update(m.file_size)
    atomic_write_text(marker, f"{sha256_of(archive)}\n")


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
