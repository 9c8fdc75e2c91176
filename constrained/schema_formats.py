"""`format` values: which are JSON Schema's own, and our exact patterns for some of them.

Per the specification (2020-12 §7.2.3, draft-07 §7.2) an implementation must not fail on an
unknown `format` value: custom values (`int32`, `color`, `grid`...) are annotations. The formats
the drafts define are assertions we either enforce exactly or refuse.
"""

from __future__ import annotations

# Every format defined by drafts 04, 06, 07, 2019-09 and 2020-12.
STANDARD_FORMATS = frozenset({
    "date-time", "date", "time", "duration", "email", "idn-email", "hostname", "idn-hostname",
    "ipv4", "ipv6", "uri", "uri-reference", "iri", "iri-reference", "uuid", "uri-template",
    "json-pointer", "relative-json-pointer", "regex",
})

# Calendar-exact RFC 3339 formats. Backends' own regexes accept 2021-02-30 or any ':60'; we
# substitute these (Feb 29 only in leap years; no leap seconds: rejecting a rare valid time
# keeps every output valid, accepting an invalid one would not).
_Y = "[0-9]{4}"
_LEAP = "(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_DATE = (f"(?:{_Y}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
         f"|02-(?:0[1-9]|1[0-9]|2[0-8]))|{_LEAP}-02-29)")
_TIME = "(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\\.[0-9]+)?(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"

# RFC 3986 URI-reference (ASCII only, as the RFC says), built from its ABNF.
_HEX = "[0-9A-Fa-f]"
_PCT = f"%{_HEX}{_HEX}"
_UNRESERVED = "A-Za-z0-9\\-._~"
_SUB_DELIMS = "!$&'()*+,;="
_PCHAR = f"(?:[{_UNRESERVED}{_SUB_DELIMS}:@]|{_PCT})"
_SEGMENT_NZ_NC = f"(?:[{_UNRESERVED}{_SUB_DELIMS}@]|{_PCT})+"
_QUERY = f"(?:{_PCHAR}|[/?])*"
_DEC_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = f"{_DEC_OCTET}(?:\\.{_DEC_OCTET}){{3}}"
_H16 = f"{_HEX}{{1,4}}"
_LS32 = f"(?:{_H16}:{_H16}|{_IPV4})"


def _ipv6() -> str:
    """RFC 3986 §3.2.2 IPv6address: the nine forms of `::` placement."""
    forms = [f"(?:{_H16}:){{6}}{_LS32}", f"::(?:{_H16}:){{5}}{_LS32}"]
    for before in range(0, 7):  # up to `before` h16 groups ahead of "::"
        after = 4 - before
        head = f"(?:(?:{_H16}:){{0,{before}}}{_H16})?" if before else f"(?:{_H16})?"
        if after >= 0:
            tail = f"(?:{_H16}:){{{after}}}{_LS32}" if after else _LS32
        else:
            tail = _H16 if before == 5 else ""
        forms.append(f"{head}::{tail}")
    return "(?:" + "|".join(forms) + ")"


_IP_LITERAL = f"\\[(?:{_ipv6()}|v{_HEX}+\\.[{_UNRESERVED}{_SUB_DELIMS}:]+)\\]"
_REG_NAME = f"(?:[{_UNRESERVED}{_SUB_DELIMS}]|{_PCT})*"
_AUTHORITY = (f"(?:(?:[{_UNRESERVED}{_SUB_DELIMS}:]|{_PCT})*@)?(?:{_IP_LITERAL}|{_REG_NAME})"
              "(?::[0-9]*)?")
_PATH_ABEMPTY = f"(?:/{_PCHAR}*)*"
_PATH_ABSOLUTE = f"/(?:{_PCHAR}+{_PATH_ABEMPTY})?"
_RELATIVE_PART = (f"(?://{_AUTHORITY}{_PATH_ABEMPTY}|{_PATH_ABSOLUTE}|{_SEGMENT_NZ_NC}{_PATH_ABEMPTY}|)")
_HIER_PART = f"(?://{_AUTHORITY}{_PATH_ABEMPTY}|{_PATH_ABSOLUTE}|{_PCHAR}+{_PATH_ABEMPTY}|)"
_SCHEME = "[A-Za-z][A-Za-z0-9+\\-.]*"
_URI = f"{_SCHEME}:{_HIER_PART}(?:\\?{_QUERY})?(?:#{_QUERY})?"
_RELATIVE_REF = f"{_RELATIVE_PART}(?:\\?{_QUERY})?(?:#{_QUERY})?"

# RFC 6901 / draft-handrews-relative-json-pointer-01.
_JSON_POINTER = "(?:/(?:[^~/]|~[01])*)*"

# RFC 6570 §2 URI-Template: literals (ASCII subset, ucschar, iprivate, pct-encoded) and
# expressions "{" [operator] varspec *("," varspec) "}".
_UCSCHAR = "\\u00a0-\\ud7ff\\uf900-\\ufdcf\\ufdf0-\\uffef" + "".join(
    f"\\U{plane:04x}{0x1000 if plane == 0xE else 0:04x}-\\U{plane:04x}fffd" for plane in range(1, 15))
_IPRIVATE = "\\ue000-\\uf8ff\\U000f0000-\\U000ffffd\\U00100000-\\U0010fffd"
_LITERAL = f"[!#$&(-;=?-\\[\\]_a-z~{_UCSCHAR}{_IPRIVATE}]|{_PCT}"
_VARCHAR = f"(?:[A-Za-z0-9_]|{_PCT})"
_VARSPEC = f"{_VARCHAR}(?:\\.?{_VARCHAR})*(?::[1-9][0-9]{{0,3}}|\\*)?"
_URI_TEMPLATE = f"(?:{_LITERAL}|\\{{[+#./;?&=,!@|]?{_VARSPEC}(?:,{_VARSPEC})*\\}})*"

FORMAT_PATTERNS = {
    "date": f"^{_DATE}$",
    "time": f"^{_TIME}$",
    "date-time": f"^{_DATE}[Tt]{_TIME}$",
    "uri-reference": f"^(?:{_URI}|{_RELATIVE_REF})$",
    "json-pointer": f"^{_JSON_POINTER}$",
    "relative-json-pointer": f"^(?:0|[1-9][0-9]*)(?:#|{_JSON_POINTER})$",
    "uri-template": f"^{_URI_TEMPLATE}$",
}

# For disjointness proofs (`oneOf` of formats): a character every string of the format contains,
# and the only characters strings of the format can hold. From the RFCs (URI scheme ':', RFC 5321
# '@', RFC 4291 ':', RFC 4122 '-', RFC 1123 host names of letters, digits, '-' and '.') and what
# llguidance's regexes for them accept (tests/constrained/test_schema_formats.py checks both).
_NEEDS = {"uri": ":", "ipv6": ":", "email": "@", "idn-email": "@", "uuid": "-", "ipv4": ".",
          "time": ":", "date-time": ":"}
_ALPHABET = {"hostname": frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-."),
             "ipv4": frozenset("0123456789."), "date": frozenset("0123456789-"),
             "uuid": frozenset("0123456789abcdefABCDEF-")}


def formats_disjoint(f: str, g: str) -> bool:
    """True only when no string is valid for both formats (a character one needs, the other lacks)."""
    return any(x in _NEEDS and y in _ALPHABET and _NEEDS[x] not in _ALPHABET[y] for x, y in ((f, g), (g, f)))


# Exact complements (every string not of the format), for `not` / `oneOf` of formats. IPv4 (RFC
# 2673 dotted quad, no leading zeros, as Python's ipaddress and `jsonschema` read it): a string is
# none exactly when it holds a character other than digits and dots, is empty, has an empty label
# (a leading, trailing or double dot), has other than four labels, or a label that is no decimal
# octet (0-255 without a leading zero).
_BAD_OCTET = "(?:0[0-9]+|[0-9]{4,}|[3-9][0-9]{2}|2[6-9][0-9]|25[6-9])"
NOT_FORMAT = {
    "ipv4": ("^(?:[\\s\\S]*[^0-9.][\\s\\S]*|[0-9.]*\\.\\.[0-9.]*|\\.[0-9.]*|[0-9.]*\\.|"
             "[0-9]+(?:\\.[0-9]+){0,2}|[0-9]+(?:\\.[0-9]+){4,}|"
             f"(?:[0-9]+\\.)*{_BAD_OCTET}(?:\\.[0-9]+)*|)$"),
}
# (f, g): every string of format f has format g. A dotted quad is an RFC 1123 host name (labels of
# 1-3 digits: `jsonschema`'s fqdn check and llguidance's regex both accept them).
FORMAT_WITHIN = frozenset({("ipv4", "hostname")})
