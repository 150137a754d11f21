"""What an uploaded document says: its kind judged from its bytes, its text (page by page
for a PDF), and that text cut into overlapping chunks.

Pure functions, no I/O but the bytes given. Invariants:
- the kind comes from the content (``chat.uploads.Sniffer``) and, for text, the file's
  extension: PDF (by its magic number), HTML, Markdown, plain text (UTF-8). A file named
  ``.pdf`` that is not a PDF is refused, never read as text;
- a file that cannot become a document is refused with ``DocumentRefused`` (400, with a
  ``code`` saying why: ``empty_file``, ``not_a_pdf``, ``encrypted_pdf``, ``unreadable_pdf``,
  ``no_text``) or ``UnsupportedDocument`` (415), before anything of it is stored;
- a chunk is at most ``CHUNK_CHARS`` characters, consecutive chunks share about
  ``OVERLAP_CHARS`` characters, cuts fall at paragraph, sentence or word boundaries when
  there is one. A PDF's chunks never cross a page boundary, so a chunk's ``page`` (from
  1) is exact; other kinds have no pages (None). Ordinals count from 0 in reading order.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from html.parser import HTMLParser

from parley.errors import InvalidRequest

PDF = "application/pdf"
HTML = "text/html"
MARKDOWN = "text/markdown"
TEXT = "text/plain"
KINDS = frozenset({PDF, HTML, MARKDOWN, TEXT})

# all-MiniLM-L6-v2 reads 256 word pieces: about 1,000 characters of English prose.
CHUNK_CHARS = 1000
OVERLAP_CHARS = 200
# Beyond this, a PDF is refused rather than read (a page tree this large is an attack or
# a mistake, and each page costs an extraction).
MAX_PAGES = 5000

_HTML_EXTENSIONS = (".html", ".htm", ".xhtml")
_MARKDOWN_EXTENSIONS = (".md", ".markdown")
_HTML_START = re.compile(rb"\A(?:\xef\xbb\xbf)?\s*(?:<!doctype\s+html|<html[\s>])", re.IGNORECASE)
_SPACES = re.compile(r"[ \t\f\v\r\u00a0]+")
_BLANK_LINES = re.compile(r"\n\s*\n\s*")


class DocumentRefused(InvalidRequest):
    """A file that cannot become a document; nothing of it is kept."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message, "file")
        self.code = code


class UnsupportedDocument(DocumentRefused):
    status = 415

    def __init__(self, message: str) -> None:
        super().__init__(message, "unsupported_media_type")


@dataclass(frozen=True, slots=True)
class Extracted:
    """A document's text: one entry per page for a PDF, a single one otherwise."""

    mime_type: str
    pages: tuple[str, ...]
    paged: bool

    @property
    def page_count(self) -> int | None:
        return len(self.pages) if self.paged else None


@dataclass(frozen=True, slots=True)
class ChunkText:
    ordinal: int
    page: int | None
    content: str


def document_type(filename: str, sniffed: str | None, head: bytes = b"") -> str:
    """The document kind of a file whose content ``chat.uploads.Sniffer`` judged to be
    ``sniffed`` (None: binary of no known kind); ``head``: its first bytes, to tell HTML
    named ``.txt`` from text. Refuses what is not a document."""
    lowered = filename.lower()
    if sniffed == PDF:
        return PDF
    if lowered.endswith(".pdf"):
        raise DocumentRefused(
            "the file is named .pdf but its content is not a PDF (no %PDF header)", "not_a_pdf"
        )
    if sniffed is None or sniffed.startswith("image/") or sniffed not in _TEXTUAL:
        what = f"files of type {sniffed}" if sniffed else "binary files"
        raise UnsupportedDocument(
            f"{what} are not accepted as documents: upload PDF, HTML, Markdown or UTF-8 text"
        )
    if lowered.endswith(_HTML_EXTENSIONS) or _HTML_START.match(head):
        return HTML
    if lowered.endswith(_MARKDOWN_EXTENSIONS):
        return MARKDOWN
    return TEXT


# What the sniffer calls text (``chat.uploads.TEXT_TYPES``): all read as text here.
_TEXTUAL = frozenset({"text/plain", "text/markdown", "text/csv", "application/json"})


def extract(data: bytes, mime_type: str) -> Extracted:
    """The text of ``data`` read as ``mime_type`` (one of ``KINDS``)."""
    if not data:
        raise DocumentRefused("the file is empty", "empty_file")
    if mime_type == PDF:
        pages = _pdf_pages(data)
        if not any(page.strip() for page in pages):
            raise DocumentRefused(
                "the PDF has no text to extract (a scanned PDF needs OCR, which parley "
                "does not do)",
                "no_text",
            )
        return Extracted(PDF, pages, paged=True)
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        raise UnsupportedDocument("the file is not UTF-8 text") from None
    if mime_type == HTML:
        text = html_text(text)
    elif mime_type not in KINDS:
        raise UnsupportedDocument(f"{mime_type} is not a document type")
    if not text.strip():
        raise DocumentRefused("the file has no text", "no_text")
    return Extracted(mime_type, (text,), paged=False)


def _pdf_pages(data: bytes) -> tuple[str, ...]:
    # Imported here: pypdf is only needed when a PDF arrives.
    from pypdf import PasswordType, PdfReader
    from pypdf.errors import DependencyError

    if not data.startswith(b"%PDF"):
        raise DocumentRefused("the file is not a PDF (no %PDF header)", "not_a_pdf")
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            try:
                # An empty user password opens PDFs that restrict only editing / printing.
                opened = reader.decrypt("") != PasswordType.NOT_DECRYPTED
            except (DependencyError, NotImplementedError):
                opened = False
            if not opened:
                raise DocumentRefused(
                    "the PDF is encrypted with a password: upload an unencrypted copy",
                    "encrypted_pdf",
                )
        count = len(reader.pages)
        if count > MAX_PAGES:
            raise DocumentRefused(
                f"the PDF has {count} pages; at most {MAX_PAGES} are accepted", "unreadable_pdf"
            )
        return tuple(_clean(page.extract_text() or "") for page in reader.pages)
    except DocumentRefused:
        raise
    except Exception as exc:
        # pypdf raises many kinds of errors on a damaged file (its own, ValueError,
        # KeyError, struct errors...): all of them mean "this PDF cannot be read".
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        detail = f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__
        raise DocumentRefused(f"the PDF cannot be read ({detail})", "unreadable_pdf") from None


def html_text(markup: str) -> str:
    """The visible text of an HTML page: no scripts, styles or tags, block elements on
    lines of their own, entities decoded."""
    parser = _TextOfHTML()
    parser.feed(markup)
    parser.close()
    return _clean("".join(parser.parts))


class _TextOfHTML(HTMLParser):
    _SKIP = frozenset({"script", "style", "template", "noscript", "head", "svg"})
    _BLOCK = frozenset(
        {
            "p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article",
            "header", "footer", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote",
            "title", "dt", "dd", "hr", "main", "nav", "aside", "figure", "figcaption",
        }
    )  # fmt: skip

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skipping += 1
        elif tag in self._BLOCK:
            self.parts.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skipping = max(0, self._skipping - 1)
        elif tag in self._BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.parts.append(data)


def _clean(text: str) -> str:
    """Runs of spaces as one, blank-line runs as one paragraph break, lines trimmed, no
    NUL: a PDF's text may hold some (a font without a usable encoding), and PostgreSQL
    text cannot (SQLite would keep them: the databases would differ)."""
    text = text.replace("\x00", "")
    text = "\n".join(line.strip() for line in _SPACES.sub(" ", text).split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()


def chunk(
    extracted: Extracted, size: int = CHUNK_CHARS, overlap: int = OVERLAP_CHARS
) -> list[ChunkText]:
    """The document's text in overlapping chunks (see the module docstring)."""
    if not 0 <= overlap < size // 2:
        raise ValueError("overlap must be under half the chunk size")
    chunks: list[ChunkText] = []
    for number, text in enumerate(extracted.pages, start=1):
        page = number if extracted.paged else None
        for content in _pieces(text, size, overlap):
            chunks.append(ChunkText(len(chunks), page, content))
    return chunks


def _pieces(text: str, size: int, overlap: int) -> list[str]:
    pieces: list[str] = []
    start = _skip_space(text, 0)
    while start < len(text):
        end = _cut(text, start, size)
        content = text[start:end].strip()
        if content:
            pieces.append(content)
        if end >= len(text):
            break
        # Back by the overlap, then forward to the start of a word.
        back = max(end - overlap, start + 1)
        start = _skip_space(text, _word_start(text, back, end))
    return pieces


def _cut(text: str, start: int, size: int) -> int:
    """Where the chunk starting at ``start`` ends: at most ``size`` characters on, at the
    last paragraph, line, sentence or word break in its second half if there is one."""
    end = start + size
    if end >= len(text):
        return len(text)
    floor = start + size // 2
    for mark in ("\n\n", "\n", ". ", "? ", "! ", "; ", " "):
        found = text.rfind(mark, floor, end)
        if found != -1:
            return found + len(mark)
    return end


def _word_start(text: str, position: int, limit: int) -> int:
    """The first word start at or after ``position`` (before ``limit``)."""
    if position == 0 or text[position - 1].isspace():
        return position
    while position < limit and not text[position].isspace():
        position += 1
    return position


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position
