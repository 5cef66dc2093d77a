"""Downloads against a real HTTP server on 127.0.0.1 that honours Range and can cut a connection."""

import hashlib
import io
import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cnnlab.cli import main
from cnnlab.data.download import download, extract_zip, fetch_dataset
from cnnlab.errors import DataError


class Server:
    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut_first: dict[str, int] = {}  # path -> bytes sent before the first response is cut
        self.ranges: list[str | None] = []
        self.if_ranges: list[str | None] = []
        self.honour_if_range = True  # False: a server that ignores If-Range (and sends the new file's tail)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                rng = self.headers.get("Range")
                etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
                server.ranges.append(rng)
                server.if_ranges.append(self.headers.get("If-Range"))
                if rng and server.honour_if_range and self.headers.get("If-Range") not in (None, etag):
                    rng = None  # RFC 9110: the file changed, so the whole of it, with 200
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if start >= len(body) and rng:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.end_headers()
                    return
                self.send_response(206 if rng else 200)
                self.send_header("ETag", etag)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                cut = server.cut_first.pop(self.path, None)
                self.wfile.write(body[start:start + cut] if cut is not None else body[start:])
                if cut is not None:
                    self.wfile.flush()
                    self.connection.close()  # the rest never comes

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()


def make_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_cut_connection_resumes_with_range(server, tmp_path):
    body = bytes(range(256)) * 5000
    server.files["/big.bin"] = body
    server.cut_first["/big.bin"] = 300_000
    path = download(server.url + "/big.bin", tmp_path / "big.bin", hashlib.sha256(body).hexdigest(),
                    progress=False, backoff=0)
    assert path.read_bytes() == body and not (tmp_path / "big.bin.part").exists()
    assert server.ranges == [None, "bytes=300000-"]


def test_rerun_resumes_a_part_left_by_an_earlier_process(server, tmp_path):
    body = b"x" * 100_000 + b"y" * 100_000
    server.files["/a.bin"] = body
    server.cut_first["/a.bin"] = 120_000
    with pytest.raises(DataError, match="rerun the same command to resume"):
        download(server.url + "/a.bin", tmp_path / "a.bin", retries=0, progress=False)
    assert (tmp_path / "a.bin.part").stat().st_size == 120_000
    download(server.url + "/a.bin", tmp_path / "a.bin", progress=False)
    assert (tmp_path / "a.bin").read_bytes() == body and server.ranges[-1] == "bytes=120000-"


def test_checksum_mismatch_deletes_and_explains(server, tmp_path):
    server.files["/c.bin"] = b"abc" * 1000
    with pytest.raises(DataError, match="not the expected"):
        download(server.url + "/c.bin", tmp_path / "c.bin", sha256="0" * 64, progress=False)
    assert not (tmp_path / "c.bin").exists() and not (tmp_path / "c.bin.part").exists()


def test_a_part_longer_than_the_servers_file_is_not_taken_as_complete(server, tmp_path):
    """A 416 to the resume request means 'nothing left' only when the .part is exactly the server's file."""
    old = b"o" * 150_000
    server.files["/f.bin"] = old
    server.cut_first["/f.bin"] = 150_000 - 1  # an earlier process kept all but the last byte
    with pytest.raises(DataError, match="rerun"):
        download(server.url + "/f.bin", tmp_path / "f.bin", retries=0, progress=False)
    new = b"n" * 100_000  # the publisher replaced the file with a shorter one
    server.files["/f.bin"] = new
    server.honour_if_range = False  # and the server answers the Range alone: 416
    assert download(server.url + "/f.bin", tmp_path / "f.bin", progress=False).read_bytes() == new
    assert server.ranges[-2:] == ["bytes=149999-", None]
    assert not (tmp_path / "f.bin.part").exists() and not (tmp_path / "f.bin.part.json").exists()


def test_a_whole_part_left_before_its_rename_is_finished_without_downloading_again(server, tmp_path):
    body = b"w" * 50_000
    server.files["/w.bin"] = body
    download(server.url + "/w.bin", tmp_path / "w.bin", progress=False)
    (tmp_path / "w.bin").rename(tmp_path / "w.bin.part")  # as a crash between the last byte and the rename leaves it
    (tmp_path / "w.bin.part.json").write_text(json.dumps({"url": server.url + "/w.bin", "validator": None,
                                                           "total": len(body)}))
    assert download(server.url + "/w.bin", tmp_path / "w.bin", progress=False).read_bytes() == body
    assert server.ranges[-1] == "bytes=50000-"  # answered 416: nothing was sent again


@pytest.mark.parametrize("honour_if_range", [True, False])
def test_a_file_changed_on_the_server_is_fetched_again_not_spliced(server, tmp_path, honour_if_range):
    old, new = b"a" * 200_000, b"b" * 250_000
    server.files["/g.bin"] = old
    server.cut_first["/g.bin"] = 80_000
    with pytest.raises(DataError, match="rerun"):
        download(server.url + "/g.bin", tmp_path / "g.bin", retries=0, progress=False)
    server.files["/g.bin"] = new
    server.honour_if_range = honour_if_range  # without it the size in Content-Range gives the change away
    assert download(server.url + "/g.bin", tmp_path / "g.bin", progress=False).read_bytes() == new
    assert server.if_ranges[1] == '"' + hashlib.sha256(old).hexdigest()[:16] + '"'  # the stored validator


def test_a_resumed_file_is_checked_against_the_announced_size(server, tmp_path):
    body = b"z" * 100_000
    server.files["/h.bin"] = body
    server.cut_first["/h.bin"] = 40_000
    with pytest.raises(DataError, match="rerun"):
        download(server.url + "/h.bin", tmp_path / "h.bin", retries=0, progress=False)
    with open(tmp_path / "h.bin.part", "ab") as fh:  # a .part grown past the announced size
        fh.write(b"z" * 60_001)
    assert download(server.url + "/h.bin", tmp_path / "h.bin", progress=False).read_bytes() == body


def test_http_404_is_one_clear_line(server, tmp_path):
    with pytest.raises(DataError, match="HTTP 404"):
        download(server.url + "/missing.zip", tmp_path / "m.zip", progress=False)


def test_zip_slip_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    archive.write_bytes(make_zip({"ok/a.txt": b"a", "../../escape.txt": b"b"}))
    with pytest.raises(DataError, match="outside"):
        extract_zip(archive, tmp_path / "dest", progress=False)
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path.parent / "escape.txt").exists()


def test_extraction_never_overwrites_a_users_file(tmp_path):
    archive = tmp_path / "d.zip"
    archive.write_bytes(make_zip({"set/train/a/1.jpg": b"one", "set/notes.txt": b"archive's notes"}))
    dest = tmp_path / "dest"
    (dest / "set").mkdir(parents=True)
    (dest / "set" / "notes.txt").write_bytes(b"my own notes!!!")  # same size as the member, other content
    with pytest.raises(DataError, match=r"notes.txt already exists and differs .* move it away"):
        extract_zip(archive, dest, progress=False)
    assert (dest / "set" / "notes.txt").read_bytes() == b"my own notes!!!"
    assert not (dest / "set" / "train").exists()  # refused before anything was written


def test_extraction_resumes_and_recognises_completion_by_content(tmp_path):
    archive = tmp_path / "d.zip"
    archive.write_bytes(make_zip({"set/a.txt": b"a" * 1000, "set/b.txt": b"b" * 1000}))
    dest = tmp_path / "dest"
    (dest / "set").mkdir(parents=True)
    (dest / "set" / "a.txt").write_bytes(b"a" * 1000)  # left whole by an interrupted extraction
    mtime = (dest / "set" / "a.txt").stat().st_mtime_ns
    extract_zip(archive, dest, progress=False)
    assert (dest / "set" / "b.txt").read_bytes() == b"b" * 1000
    assert (dest / "set" / "a.txt").stat().st_mtime_ns == mtime  # kept, not rewritten
    (dest / "set" / "b.txt").unlink()  # the marker alone does not make an extraction complete
    extract_zip(archive, dest, progress=False)
    assert (dest / "set" / "b.txt").read_bytes() == b"b" * 1000
    archive.write_bytes(make_zip({"set/a.txt": b"a" * 1000, "set/b.txt": b"b" * 1000, "set/c.txt": b"new"}))
    extract_zip(archive, dest, progress=False)  # another archive of the same name: unpacked, not skipped
    assert (dest / "set" / "c.txt").read_bytes() == b"new"


def test_download_command_end_to_end_and_skips_finished_work(server, tmp_path, capsys):
    from PIL import Image

    members = {}
    for split in ("train", "val"):
        for cls in ("Amphibia", "Reptilia"):
            buf = io.BytesIO()
            Image.new("RGB", (20, 20), (10, 200, 30)).save(buf, "JPEG")
            members[f"inaturalist_12K/{split}/{cls}/1.jpg"] = buf.getvalue()
    data = make_zip(members)
    server.files["/nature_12K.zip"] = data
    server.cut_first["/nature_12K.zip"] = len(data) // 3
    argv = ["download", "inaturalist-12k", str(tmp_path / "data"), "--url", server.url + "/nature_12K.zip",
            "--sha256", hashlib.sha256(data).hexdigest()]
    assert main(argv) == 0
    root = tmp_path / "data" / "inaturalist_12K"
    assert (root / "train" / "Reptilia" / "1.jpg").read_bytes() == members["inaturalist_12K/train/Reptilia/1.jpg"]
    requests = len(server.ranges)
    assert fetch_dataset("inaturalist-12k", tmp_path / "data", url=server.url + "/nature_12K.zip", progress=False) == root
    assert len(server.ranges) == requests  # nothing downloaded again
    assert "cnnlab train --data" in capsys.readouterr().out
