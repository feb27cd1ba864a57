"""Reply bodies into payloads: the decoding part of the state table's work (no I/O).

JSON bodies without kombu's type markers go through the stdlib's C scanner
directly (what kombu's ``loads`` would give, without its detours); everything else
goes to the codec the table was given (kombu's registry, with the accept list). A
body whose ``content_encoding`` is not UTF-8 is decoded per that encoding first: an
unknown encoding, or bytes that are not in the one named, raise ``ValueError`` (kombu's
JSON would read any body as UTF-8, whatever its label).

This file is both twins: run as it is, it is the pure-Python decoder; compiled by Cython
as ``rpcresults.protocol._decode_c`` with the C types of ``_decode_c.pxd``, it is the
compiled one.
"""
from __future__ import annotations

import codecs
import json
import json.scanner
from encodings import aliases, normalize_encoding
from typing import Any, Callable, Dict, Optional, Tuple

__all__ = ('decode_body', 'fast_json', 'recode')

_JSON = 'application/json'
_UTF8 = 'utf-8'

_decoder = json.JSONDecoder()
_json_decode = _decoder.decode
_json_scan = json.scanner.make_scanner(_decoder)

def fast_json(text: str) -> Any:
    """``json.loads(text)`` through the C scanner directly; the full decoder handles the rest."""
    try:
        value, end = _json_scan(text, 0)
    except StopIteration:
        return _json_decode(text)  # leading white space, or not JSON: its own error
    if end != len(text):
        return _json_decode(text)  # trailing white space, or extra data: its own error
    return value


#: Content encodings of bodies that are bytes, not text (kombu hands them to the codec as they are).
_AS_IS = frozenset({'binary', 'ascii-8bit'})
#: The stdlib's encoding names and aliases, normalised: only these are looked up, since a lookup of
#: any other name is remembered by the stdlib forever (a sender inventing names would grow it).
_KNOWN = frozenset(aliases.aliases) | frozenset(aliases.aliases.values())
_codec_names: Dict[str, Optional[str]] = {}


def recode(body: bytes, encoding: str) -> Tuple[Any, str]:
    """A body in ``encoding`` as the codec's input: text (UTF-8 from here on) or, for binary
    encodings, the bytes. An unknown encoding or bytes that are not in it raise ``ValueError``:
    kombu's JSON would otherwise read any body as UTF-8 whatever its ``content_encoding``."""
    if encoding in _AS_IS:
        return body, encoding
    name = _codec_names.get(encoding, '')
    if name == '':
        name = None
        if normalize_encoding(encoding).lower() in _KNOWN:
            try:
                name = codecs.lookup(encoding).name
            except LookupError:
                pass
        if len(_codec_names) < 64:  # a sender inventing names must not grow this without bound
            _codec_names[encoding] = name
    if name is None:
        raise ValueError(f'unknown content encoding {encoding!r}')
    if name == 'utf-8':
        return body, _UTF8
    return body.decode(name).encode('utf-8'), _UTF8


def decode_body(body: bytes, content_type: Optional[str], content_encoding: Optional[str],
                decode: Callable[[Any, Optional[str], Optional[str]], Any], fast: bool) -> Any:
    """The payload of ``body``: through the C scanner when it may (``fast``), else through ``decode``."""
    if not content_encoding or content_encoding == _UTF8:  # no label (or an empty one): UTF-8, as kombu
        if fast and content_type == _JSON and b'"__type__"' not in body:
            return fast_json(body.decode('utf-8'))  # kombu's result: no type markers to revive
        return decode(body, content_type, content_encoding)
    body, content_encoding = recode(body, content_encoding)
    return decode(body, content_type, content_encoding)
