"""Downloads against a real HTTP server on 127.0.0.1 that honours Range and can cut a connection."""

import hashlib
import io
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
                server.ranges.append(rng)
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if start >= len(body) and rng:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.end_headers()
                    return
                self.send_response(206 if rng else 200)
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
    with pytest.raises(DataError, match="does not match"):
        download(server.url + "/c.bin", tmp_path / "c.bin", sha256="0" * 64, progress=False)
    assert not (tmp_path / "c.bin").exists() and not (tmp_path / "c.bin.part").exists()


def test_http_404_is_one_clear_line(server, tmp_path):
    with pytest.raises(DataError, match="HTTP 404"):
        download(server.url + "/missing.zip", tmp_path / "m.zip", progress=False)


def test_zip_slip_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    archive.write_bytes(make_zip({"ok/a.txt": b"a", "../../escape.txt": b"b"}))
    with pytest.raises(DataError, match="outside"):
        extract_zip(archive, tmp_path / "dest", progress=False)
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path.parent / "escape.txt").exists()


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
