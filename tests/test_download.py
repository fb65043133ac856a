"""Tests for preproc/download.py against a local HTTP server on 127.0.0.1.

No test touches the network beyond 127.0.0.1: the server below serves small
in-memory archives built in tmp_path, supports Range requests, and can be told
to drop the connection early or to ignore Range.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import socket
import tarfile
import threading
import zipfile

import pytest

from conftest import REALDATA, ROOT  # noqa: F401  (conftest puts ROOT on sys.path)

from preproc import download as dl  # noqa: E402


# --------------------------------------------------------------------------
# local HTTP server
# --------------------------------------------------------------------------
class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        srv = self.server
        with srv.lock:
            srv.requests.append((self.path, dict(self.headers.items())))
            drop_after = srv.drop_after
            srv.drop_after = None  # applies to one request only
        data = srv.files.get(self.path.split("?")[0])
        if data is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return

        start = 0
        status = 200
        rng = self.headers.get("Range")
        if rng and not srv.ignore_range:
            spec = rng.strip()[len("bytes="):]
            first = spec.split("-", 1)[0]
            start = int(first)
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if drop_after is not None:
            self.wfile.write(body[:drop_after])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = {}
        self.requests = []
        self.drop_after = None
        self.ignore_range = False
        self.lock = threading.Lock()

    def url(self, path):
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def count(self, path):
        return sum(1 for p, _ in self.requests if p == path)


@pytest.fixture
def server():
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


# --------------------------------------------------------------------------
# small archives
# --------------------------------------------------------------------------
def _tar_bytes(files, mode="w"):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tf.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def _zip_bytes(files):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, content in files.items():
            zf.writestr(name, content)
    return buf.getvalue()


def _md5(data):
    return hashlib.md5(data).hexdigest()


VOC_FILE = "VOCdevkit/VOC2012/ImageSets/Main/aeroplane_train.txt"
VOC_CONTENT = b"2008_000008 -1\n2008_000033  1\n" * 2000  # ~60 kB, several chunks


@pytest.fixture
def voc_tar():
    return _tar_bytes({VOC_FILE: VOC_CONTENT, "VOCdevkit/VOC2012/JPEGImages/2008_000008.jpg": b"\xff\xd8jpeg"})


def _use(monkeypatch, dataset, archives):
    monkeypatch.setitem(dl.SOURCES, dataset, archives)


def _run(tmp_path, *extra, dataset="pascal"):
    return dl.main(["--dataset", dataset, "--data-root", str(tmp_path / "data"),
                    "--timeout", "5", *extra])


# --------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------
def test_full_download_md5_extract_and_next_command(server, tmp_path, monkeypatch, capsys, voc_tar):
    server.files["/voc.tar"] = voc_tar
    name = "VOCtrainval_11-May-2012.tar"
    _use(monkeypatch, "pascal", [dl.Archive(server.url("/voc.tar"), name, _md5(voc_tar), len(voc_tar))])

    assert _run(tmp_path) == 0
    out = capsys.readouterr().out
    root = tmp_path / "data" / "pascal"
    assert (root / VOC_FILE).read_bytes() == VOC_CONTENT
    assert (root / f".extracted_{name}").exists()
    assert not (root / name).exists()  # archive deleted after extraction
    assert not (root / (name + ".part")).exists()
    assert "python preproc/format_pascal.py" in out
    assert "python preproc/generate_observed_labels.py --dataset pascal" in out
    assert out.index("format_pascal.py") < out.index("generate_observed_labels.py")

    # second run: marker present -> no new request
    assert _run(tmp_path) == 0
    assert server.count("/voc.tar") == 1
    assert "already extracted" in capsys.readouterr().out


def test_keep_archives(server, tmp_path, monkeypatch, voc_tar):
    server.files["/voc.tar"] = voc_tar
    _use(monkeypatch, "pascal", [dl.Archive(server.url("/voc.tar"), "voc.tar", _md5(voc_tar), len(voc_tar))])
    assert _run(tmp_path, "--keep-archives") == 0
    root = tmp_path / "data" / "pascal"
    assert (root / "voc.tar").read_bytes() == voc_tar
    assert (root / VOC_FILE).exists()


def test_interrupted_download_is_resumed(server, tmp_path, monkeypatch, capsys, voc_tar):
    server.files["/voc.tar"] = voc_tar
    cut = 20000
    server.drop_after = cut
    _use(monkeypatch, "pascal", [dl.Archive(server.url("/voc.tar"), "voc.tar", _md5(voc_tar), len(voc_tar))])
    root = tmp_path / "data" / "pascal"

    assert _run(tmp_path, "--no-extract") == 1
    err = capsys.readouterr().err
    assert server.url("/voc.tar") in err
    assert "resume" in err
    assert "Traceback" not in err
    part = root / "voc.tar.part"
    assert part.stat().st_size == cut
    assert not (root / "voc.tar").exists()

    assert _run(tmp_path, "--no-extract") == 0
    assert len(server.requests) == 2
    first_headers = server.requests[0][1]
    second_headers = server.requests[1][1]
    assert "Range" not in first_headers
    assert second_headers["Range"] == f"bytes={cut}-"
    assert (root / "voc.tar").read_bytes() == voc_tar
    assert not part.exists()


def test_server_ignoring_range_restarts_from_zero(server, tmp_path, voc_tar):
    server.files["/voc.tar"] = voc_tar
    server.ignore_range = True
    dest = tmp_path / "voc.tar"
    part = tmp_path / "voc.tar.part"
    part.write_bytes(voc_tar[:12345])
    dl.download(server.url("/voc.tar"), dest, md5=_md5(voc_tar), size=len(voc_tar), timeout=5, quiet=True)
    assert server.requests[0][1]["Range"] == "bytes=12345-"
    assert dest.read_bytes() == voc_tar
    assert not part.exists()


def test_quiet_prints_nothing(server, tmp_path, capsys, voc_tar):
    server.files["/voc.tar"] = voc_tar
    dest = dl.download(server.url("/voc.tar"), tmp_path / "voc.tar", size=len(voc_tar), timeout=5,
                       chunk=4096, quiet=True)
    assert dest.read_bytes() == voc_tar
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_416_with_complete_part_is_treated_as_complete(server, tmp_path, voc_tar):
    server.files["/voc.tar"] = voc_tar
    dest = tmp_path / "voc.tar"
    (tmp_path / "voc.tar.part").write_bytes(voc_tar)
    # size unknown, so the downloader has to ask; the server answers 416
    out = dl.download(server.url("/voc.tar"), dest, md5=_md5(voc_tar), size=None, timeout=5, quiet=True)
    assert out == dest
    assert server.requests[0][1]["Range"] == f"bytes={len(voc_tar)}-"
    assert dest.read_bytes() == voc_tar


def test_md5_mismatch_is_a_clear_error_and_no_final_file(server, tmp_path, monkeypatch, capsys, voc_tar):
    server.files["/voc.tar"] = voc_tar
    _use(monkeypatch, "pascal", [dl.Archive(server.url("/voc.tar"), "voc.tar", "0" * 32, len(voc_tar))])
    assert _run(tmp_path) == 1
    err = capsys.readouterr().err
    root = tmp_path / "data" / "pascal"
    assert "md5" in err and "0" * 32 in err and _md5(voc_tar) in err
    assert "what to do" in err
    assert "Traceback" not in err
    assert not (root / "voc.tar").exists()
    assert not (root / "voc.tar.part").exists()
    assert not (root / ".extracted_voc.tar").exists()
    assert not (root / "VOCdevkit").exists()


def test_size_mismatch_is_a_clear_error(server, tmp_path, monkeypatch, capsys, voc_tar):
    server.files["/voc.tar"] = voc_tar
    _use(monkeypatch, "pascal", [dl.Archive(server.url("/voc.tar"), "voc.tar", None, len(voc_tar) + 10)])
    assert _run(tmp_path) == 1
    err = capsys.readouterr().err
    assert str(len(voc_tar) + 10) in err and str(len(voc_tar)) in err
    assert "what to do" in err
    assert not (tmp_path / "data" / "pascal" / "voc.tar").exists()


def test_existing_complete_archive_is_not_downloaded_again(server, tmp_path, monkeypatch, capsys, voc_tar):
    server.files["/voc.tar"] = voc_tar
    _use(monkeypatch, "pascal", [dl.Archive(server.url("/voc.tar"), "voc.tar", _md5(voc_tar), len(voc_tar))])
    assert _run(tmp_path, "--no-extract") == 0
    assert server.count("/voc.tar") == 1
    assert _run(tmp_path, "--no-extract") == 0
    assert server.count("/voc.tar") == 1  # verified locally, not fetched again
    # and it is then extracted from the local copy, still without a request
    assert _run(tmp_path) == 0
    assert server.count("/voc.tar") == 1
    assert (tmp_path / "data" / "pascal" / VOC_FILE).exists()


def test_offline_gives_clear_message(tmp_path, monkeypatch, capsys):
    # a port on 127.0.0.1 that nobody listens on
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    url = f"http://127.0.0.1:{port}/voc.tar"
    _use(monkeypatch, "pascal", [dl.Archive(url, "voc.tar", None, None)])
    assert _run(tmp_path) == 1
    captured = capsys.readouterr()
    err = captured.err
    assert url in err
    assert "refused" in err
    assert "internet connection" in err
    assert str(tmp_path / "data" / "pascal" / "voc.tar") in err  # where to put a manual download
    assert "Traceback" not in err + captured.out


def test_unresponsive_server_times_out_with_clear_message(tmp_path, monkeypatch, capsys):
    # listens on 127.0.0.1 but never answers: the read must time out
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/voc.tar"
        _use(monkeypatch, "pascal", [dl.Archive(url, "voc.tar", None, None)])
        rc = dl.main(["--dataset", "pascal", "--data-root", str(tmp_path / "data"), "--timeout", "0.3"])
    finally:
        sock.close()
    assert rc == 1
    err = capsys.readouterr().err
    assert url in err and "timed out" in err and "Traceback" not in err


def test_dns_failure_message(tmp_path, monkeypatch, capsys):
    def fake_urlopen(*args, **kwargs):
        raise dl.urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(dl.urllib.request, "urlopen", fake_urlopen)
    _use(monkeypatch, "pascal", [dl.Archive("http://example.invalid/voc.tar", "voc.tar", None, None)])
    assert _run(tmp_path) == 1
    err = capsys.readouterr().err
    assert "could not be resolved" in err and "offline" in err


@pytest.mark.parametrize("kind", ["incomplete", "wrong md5"])
def test_users_bad_archive_is_reported_and_left_untouched(server, tmp_path, monkeypatch, capsys, voc_tar, kind):
    # a file the user saved under the final name is never renamed, resumed into or deleted
    server.files["/voc.tar"] = voc_tar
    _use(monkeypatch, "pascal", [dl.Archive(server.url("/voc.tar"), "voc.tar", _md5(voc_tar), len(voc_tar))])
    root = tmp_path / "data" / "pascal"
    root.mkdir(parents=True)
    mine = voc_tar[:30000] if kind == "incomplete" else voc_tar[:-1] + b"x"
    (root / "voc.tar").write_bytes(mine)
    assert _run(tmp_path) == 1
    err = capsys.readouterr().err
    assert str(root / "voc.tar") in err and "left as it is" in err and "delete it" in err
    assert (f"expected {len(voc_tar)} bytes" if kind == "incomplete" else f"expected {_md5(voc_tar)}") in err
    assert "Traceback" not in err
    assert sorted(p.name for p in root.iterdir()) == ["voc.tar"]  # no .part, no .corrupt, no marker
    assert (root / "voc.tar").read_bytes() == mine
    assert server.requests == []  # nothing downloaded over it


def test_data_root_is_a_file(tmp_path, monkeypatch, capsys):
    _use(monkeypatch, "pascal", [dl.Archive("http://127.0.0.1:9/voc.tar", "voc.tar", None, None)])
    (tmp_path / "data").write_text("not a folder")
    assert _run(tmp_path) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: cannot write to ")
    assert f"{tmp_path / 'data'} is a file" in err and "--data-root" in err


def test_data_root_not_writable(tmp_path, monkeypatch, capsys):
    # simulated (the tests may run as root, for whom chmod does not make a folder read-only)
    _use(monkeypatch, "pascal", [dl.Archive("http://127.0.0.1:9/voc.tar", "voc.tar", None, None)])
    monkeypatch.setattr(dl.os, "access", lambda *args, **kwargs: False)
    assert _run(tmp_path) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not writable" in err and "--data-root" in err
    assert not (tmp_path / "data").exists()


def test_disk_full_during_extraction(server, tmp_path, monkeypatch, capsys, voc_tar):
    import errno

    import torchvision.datasets.utils as tv_utils

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "data" / "pascal" / "x"))

    server.files["/voc.tar"] = voc_tar
    _use(monkeypatch, "pascal", [dl.Archive(server.url("/voc.tar"), "voc.tar", _md5(voc_tar), len(voc_tar))])
    monkeypatch.setattr(tv_utils, "extract_archive", full)
    assert _run(tmp_path, "--quiet") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no space left" in err and "Traceback" not in err
    root = tmp_path / "data" / "pascal"
    assert (root / "voc.tar").read_bytes() == voc_tar  # kept: the next run extracts it without downloading
    assert not (root / ".extracted_voc.tar").exists()


def test_disk_full_while_downloading_keeps_the_part(server, tmp_path, monkeypatch, capsys, voc_tar):
    import builtins
    import errno

    class FullDisk:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, block):  # the disk fills up after 8192 bytes
            room = 8192 - self.fh.tell()
            self.fh.write(block[:room])
            if len(block) > room:
                raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            self.fh.flush()

    def fake_open(path, mode="r", *args, **kwargs):
        fh = builtins.open(path, mode, *args, **kwargs)
        return FullDisk(fh) if str(path).endswith(".part") else fh

    server.files["/voc.tar"] = voc_tar
    _use(monkeypatch, "pascal", [dl.Archive(server.url("/voc.tar"), "voc.tar", _md5(voc_tar), len(voc_tar))])
    monkeypatch.setattr(dl, "open", fake_open, raising=False)
    assert _run(tmp_path, "--quiet", "--no-extract") == 1
    err = capsys.readouterr().err
    part = tmp_path / "data" / "pascal" / "voc.tar.part"
    assert err.startswith(f"error: cannot write {part}: no space left") and "resumes" in err
    assert part.stat().st_size == 8192  # kept for the next run
    monkeypatch.undo()
    _use(monkeypatch, "pascal", [dl.Archive(server.url("/voc.tar"), "voc.tar", _md5(voc_tar), len(voc_tar))])
    assert _run(tmp_path, "--quiet", "--no-extract") == 0
    assert server.requests[-1][1]["Range"] == "bytes=8192-"
    assert (tmp_path / "data" / "pascal" / "voc.tar").read_bytes() == voc_tar


def test_data_root_a_file_as_a_script(tmp_path):
    import subprocess
    import sys

    (tmp_path / "data").write_text("x")
    res = subprocess.run([sys.executable, "preproc/download.py", "--dataset", "cub", "--data-root",
                          str(tmp_path / "data")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr == (f"error: cannot write to {tmp_path / 'data' / 'cub'}: {tmp_path / 'data'} is a file, "
                          "not a folder; choose another --data-root (or move that file away)\n")


def test_bad_timeout_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _run(tmp_path, "--timeout", "0")
    assert exc.value.code == 2
    assert "expected a positive number of seconds" in capsys.readouterr().err


def test_http_404_gives_clear_message(server, tmp_path, monkeypatch, capsys):
    _use(monkeypatch, "pascal", [dl.Archive(server.url("/missing.tar"), "voc.tar", None, None)])
    assert _run(tmp_path) == 1
    err = capsys.readouterr().err
    assert "HTTP 404" in err and server.url("/missing.tar") in err


def test_cub_tgz_layout(server, tmp_path, monkeypatch, capsys):
    tgz = _tar_bytes({
        "CUB_200_2011/images.txt": b"1 001.Black_footed_Albatross/a.jpg\n",
        "CUB_200_2011/attributes/image_attribute_labels.txt": b"1 1 0 3 27.7\n",
        "attributes.txt": b"1 has_bill_shape::curved_(up_or_down)\n",
    }, mode="w:gz")
    server.files["/CUB_200_2011.tgz"] = tgz
    _use(monkeypatch, "cub", [dl.Archive(server.url("/CUB_200_2011.tgz"), "CUB_200_2011.tgz",
                                         _md5(tgz), len(tgz))])
    assert _run(tmp_path, dataset="cub") == 0
    root = tmp_path / "data" / "cub"
    assert (root / "CUB_200_2011" / "images.txt").exists()
    assert (root / "attributes.txt").read_bytes().startswith(b"1 has_bill_shape")
    out = capsys.readouterr().out
    assert "python preproc/format_cub.py" in out
    assert "python preproc/generate_observed_labels.py --dataset cub" in out


def test_coco_zips_layout(server, tmp_path, monkeypatch, capsys):
    ann = _zip_bytes({"annotations/instances_train2014.json": b'{"images": []}',
                      "annotations/instances_val2014.json": b'{"images": []}'})
    train = _zip_bytes({"train2014/COCO_train2014_000000000009.jpg": b"jpg"})
    val = _zip_bytes({"val2014/COCO_val2014_000000000042.jpg": b"jpg"})
    server.files.update({"/ann.zip": ann, "/train2014.zip": train, "/val2014.zip": val})
    _use(monkeypatch, "coco", [
        dl.Archive(server.url("/ann.zip"), "annotations_trainval2014.zip", None, len(ann),
                   hashlib.sha256(ann).hexdigest()),
        dl.Archive(server.url("/train2014.zip"), "train2014.zip", _md5(train), len(train)),
        dl.Archive(server.url("/val2014.zip"), "val2014.zip", _md5(val), None),
    ])
    assert _run(tmp_path, dataset="coco") == 0
    root = tmp_path / "data" / "coco"
    assert (root / "annotations" / "instances_train2014.json").exists()
    assert (root / "train2014" / "COCO_train2014_000000000009.jpg").exists()
    assert (root / "val2014" / "COCO_val2014_000000000042.jpg").exists()
    for name in ("annotations_trainval2014.zip", "train2014.zip", "val2014.zip"):
        assert not (root / name).exists()
        assert (root / f".extracted_{name}").exists()
    assert "python preproc/format_coco.py" in capsys.readouterr().out


def test_sha256_mismatch(server, tmp_path, voc_tar):
    server.files["/voc.tar"] = voc_tar
    with pytest.raises(dl.ChecksumError, match="sha256"):
        dl.download(server.url("/voc.tar"), tmp_path / "voc.tar", sha256="f" * 64, timeout=5, quiet=True)
    assert not (tmp_path / "voc.tar").exists()


def test_path_traversal_tar_rejected(tmp_path):
    evil = tmp_path / "evil.tar"
    evil.write_bytes(_tar_bytes({"ok/file.txt": b"fine", "../escaped.txt": b"bad"}))
    dest = tmp_path / "out"
    with pytest.raises(dl.UnsafeArchiveError):
        dl.extract(evil, dest)
    assert not (tmp_path / "escaped.txt").exists()
    assert not (dest / "ok" / "file.txt").exists()  # nothing extracted at all


def test_absolute_and_symlink_members_rejected(tmp_path):
    abs_tar = tmp_path / "abs.tar"
    abs_tar.write_bytes(_tar_bytes({"/tmp/absolute_member.txt": b"bad"}))
    with pytest.raises(dl.UnsafeArchiveError):
        dl.extract(abs_tar, tmp_path / "out1")

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        link = tarfile.TarInfo("innocent")
        link.type = tarfile.SYMTYPE
        link.linkname = "../../outside"
        tf.addfile(link)
    sym_tar = tmp_path / "sym.tar"
    sym_tar.write_bytes(buf.getvalue())
    with pytest.raises(dl.UnsafeArchiveError):
        dl.extract(sym_tar, tmp_path / "out2")


def test_path_traversal_zip_rejected_via_main(server, tmp_path, monkeypatch, capsys):
    evil = _zip_bytes({"annotations/ok.json": b"{}", "../../escaped.json": b"{}"})
    server.files["/evil.zip"] = evil
    _use(monkeypatch, "coco", [dl.Archive(server.url("/evil.zip"), "annotations_trainval2014.zip",
                                          _md5(evil), len(evil))])
    assert _run(tmp_path, dataset="coco") == 1
    err = capsys.readouterr().err
    assert "outside" in err and "Traceback" not in err
    root = tmp_path / "data" / "coco"
    assert not (root / ".extracted_annotations_trainval2014.zip").exists()
    assert not (root / "annotations" / "ok.json").exists()
    assert not (tmp_path / "escaped.json").exists()


def test_corrupt_archive_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is an HTML error page, not an archive")
    with pytest.raises(dl.DownloadError, match="neither a tar nor a zip"):
        dl.extract(bad, tmp_path / "out")


def test_next_commands_follow_data_root():
    assert dl.next_commands("coco") == ["python preproc/format_coco.py",
                                        "python preproc/generate_observed_labels.py --dataset coco"]
    assert dl.next_commands("coco", "./data") == dl.next_commands("coco")
    fmt, gen = dl.next_commands("coco", "/big/disk")
    assert fmt == "python preproc/format_coco.py --load-path /big/disk/coco --save-path /big/disk/coco"
    assert gen == "python preproc/generate_observed_labels.py --dataset coco --data-root /big/disk"


def test_nuswide_prints_manual_instructions(tmp_path, monkeypatch, capsys):
    def no_network(*args, **kwargs):
        raise AssertionError("nuswide must not download anything")

    monkeypatch.setattr(dl.urllib.request, "urlopen", no_network)
    assert _run(tmp_path, dataset="nuswide") == 0
    out = capsys.readouterr().out
    assert dl.NUSWIDE_PAGE in out
    for where in ("nuswide/Flickr/", "nuswide/Groundtruth/", "nuswide/ImageList/",
                  "nuswide/Concepts81.txt", "formatted_", "python preproc/format_nuswide.py"):
        assert where in out
    assert not (tmp_path / "data" / "nuswide").exists()
