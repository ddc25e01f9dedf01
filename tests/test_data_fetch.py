"""Tests for data/fetch.py: mirror copy, skip, checksum failure, download paths.

No internet is needed: downloads go to a local HTTP server or a closed port.
"""

import functools
import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "data" / "fetch.py"
MIRROR = REPO.parent / "shared" / "data"
PTB_SHA256 = {
    "train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
    "valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
    "test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
}


def run_fetch(*args, url_base=None):
    """Run data/fetch.py in a subprocess; return the CompletedProcess."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.pop("LMTRAIN_DATA_URL_BASE", None)
    if url_base is not None:
        env["LMTRAIN_DATA_URL_BASE"] = url_base
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=60)


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_one_error_line(proc):
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in proc.stderr + proc.stdout


def assert_no_final_files(folder):
    """No corpus file under its final name, and no temporary file left over."""
    if folder.exists():
        assert sorted(p.name for p in folder.iterdir()) == []


@pytest.fixture
def mirror():
    if not (MIRROR / "ptb" / "train.txt").is_file():
        pytest.skip(f"no data mirror at {MIRROR}")
    return MIRROR


@pytest.fixture
def corrupt_mirror(mirror, tmp_path):
    """A copy of the PTB mirror whose train.txt has one byte altered."""
    root = tmp_path / "bad-mirror"
    shutil.copytree(mirror / "ptb", root / "ptb")
    train = root / "ptb" / "train.txt"
    train.chmod(0o644)
    data = bytearray(train.read_bytes())
    data[100] ^= 0x01
    train.write_bytes(bytes(data))
    return root


@pytest.fixture
def http_base(mirror):
    """A local HTTP server serving the mirror; yields its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(mirror))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_mirror_copy_then_skip(mirror, tmp_path):
    dest = tmp_path / "dest"
    proc = run_fetch("--dest", dest, "--mirror", mirror, "--only", "ptb")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert len(proc.stdout.splitlines()) == 3
    assert sorted(p.name for p in (dest / "ptb").iterdir()) == sorted(PTB_SHA256)
    for name, digest in PTB_SHA256.items():
        assert sha256(dest / "ptb" / name) == digest
    assert not (dest / "wikitext-2").exists()

    again = run_fetch("--dest", dest, "--mirror", mirror, "--only", "ptb")
    assert again.returncode == 0, again.stderr
    lines = again.stdout.splitlines()
    assert len(lines) == 3
    assert all("skipped" in line for line in lines)


def test_wrong_existing_file_is_replaced(mirror, tmp_path):
    dest = tmp_path / "dest"
    (dest / "ptb").mkdir(parents=True)
    (dest / "ptb" / "valid.txt").write_text("stale\n")
    proc = run_fetch("--dest", dest, "--mirror", mirror, "--only", "ptb")
    assert proc.returncode == 0, proc.stderr
    assert sha256(dest / "ptb" / "valid.txt") == PTB_SHA256["valid.txt"]


def test_corrupt_mirror_fails_cleanly(corrupt_mirror, tmp_path):
    dest = tmp_path / "dest"
    proc = run_fetch("--dest", dest, "--mirror", corrupt_mirror, "--only", "ptb")
    assert_one_error_line(proc)
    assert "checksum mismatch" in proc.stderr
    assert "ptb/train.txt" in proc.stderr
    assert_no_final_files(dest / "ptb")


def test_missing_mirror_file(tmp_path):
    dest = tmp_path / "dest"
    proc = run_fetch("--dest", dest, "--mirror", tmp_path / "nowhere", "--only", "ptb")
    assert_one_error_line(proc)
    assert "ptb/train.txt" in proc.stderr
    assert_no_final_files(dest / "ptb")


def test_offline_fails_cleanly(tmp_path):
    dest = tmp_path / "dest"
    proc = run_fetch("--dest", dest, "--only", "ptb", url_base="http://127.0.0.1:9/")
    assert_one_error_line(proc)
    assert "cannot download ptb/train.txt from http://127.0.0.1:9/ptb/train.txt" in proc.stderr
    assert "--mirror" in proc.stderr
    assert_no_final_files(dest / "ptb")


def test_download_from_local_server(http_base, tmp_path):
    dest = tmp_path / "dest"
    proc = run_fetch("--dest", dest, "--only", "ptb", url_base=http_base)
    assert proc.returncode == 0, proc.stderr
    for name, digest in PTB_SHA256.items():
        assert sha256(dest / "ptb" / name) == digest
    assert all("downloaded" in line for line in proc.stdout.splitlines())


def test_http_error_fails_cleanly(http_base, tmp_path):
    dest = tmp_path / "dest"
    proc = run_fetch("--dest", dest, "--only", "ptb", url_base=http_base + "missing/")
    assert_one_error_line(proc)
    assert "HTTP 404" in proc.stderr
    assert_no_final_files(dest / "ptb")


def test_in_process_url_base_argument(tmp_path, capsys, monkeypatch):
    """main() takes url_base directly, without the environment variable."""
    for key in [k for k in os.environ if "proxy" in k.lower()]:
        monkeypatch.delenv(key)
    import importlib.util
    spec = importlib.util.spec_from_file_location("lmtrain_data_fetch", SCRIPT)
    fetch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch)
    status = fetch.main(["--dest", str(tmp_path), "--only", "wikitext-2"],
                        url_base="http://127.0.0.1:9/", timeout=5)
    assert status == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot download wikitext-2/train.txt")
