"""Built-in PII and secret detectors: regex branches, their validators, and value normalisation."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate
from types import MappingProxyType
from typing import Any

DETECTOR_TYPES = ("email", "phone", "credit_card", "ssn", "iban", "ip", "secret")

# A validator sees the whole text and the span that would be masked; it returns the end of
# the span it accepts (the same end, or an earlier one to trim a candidate), or -1 to reject.
Validator = Callable[[str, int, int], int]


@dataclass(frozen=True, slots=True)
class Branch:
    """One alternative of the combined pattern.

    The text is scanned from one non-alphanumeric "anchor" character to the next where a
    branch may match: a branch starts right after its anchor, or on it (`at_anchor`)."""

    name: str  # group name in the combined pattern, unique
    kind: str  # the detector type it reports
    first: str  # character class of its first character (the anchor's, if at_anchor)
    pattern: str  # regex source; bounded or possessive repetitions only
    value: str | None = None  # group that is masked (e.g. the value of `password=`); None: all
    validate: Validator | None = None
    scan: str | None = None  # a cheaper superset of `pattern` for the scan; the pattern decides
    at_anchor: bool = False


def _branch(
    name: str, kind: str, first: str, not_after: str, rest: str, peek: str = "", **kw: Any
) -> Branch:
    """A branch whose first character, of class `first`, does not follow one of `not_after`.

    The lookbehind comes after the first character, so that the regex engine rejects most
    positions on their first character alone, and after `peek` (a cheap lookahead on what
    follows), so that it rejects most others without looking back."""
    check = f"(?={peek})" if peek else ""
    return Branch(name, kind, first, f"{first}{check}(?<!{not_after}[\\s\\S]){rest}", **kw)


# --- validators --------------------------------------------------------------------------


_DOUBLED = MappingProxyType(  # Luhn: a doubled digit, its digits summed
    {"0": 0, "1": 2, "2": 4, "3": 6, "4": 8, "5": 1, "6": 3, "7": 5, "8": 7, "9": 9}
)


def _luhn(digits: str) -> bool:
    """Luhn: every second digit from the right doubled (its digits summed), total % 10 == 0."""
    odd = sum(map(int, digits[-1::-2]))
    return (odd + sum(map(_DOUBLED.__getitem__, digits[-2::-2]))) % 10 == 0


def _card_prefix_ok(digits: str) -> bool:
    """Issuer sanity: 13 digits only for Visa (4), 14 for Diners (3), 15 for UATP (1) and
    Amex/JCB (3); 16 to 19 digits for industry identifiers 2 to 6."""
    first, n = digits[0], len(digits)
    if n == 13:
        return first == "4"
    if n == 14:
        return first == "3"
    if n == 15:
        return first in "13"
    return first in "23456"


def validate_card(text: str, start: int, end: int) -> int:
    """The longest prefix of the digit groups that is a valid card, so that `4111 1111 1111
    1111 2026` masks the card and keeps the year: 13 to 19 digits, issuer prefix, Luhn."""
    runs = text[start:end].replace("-", " ").split(" ")
    sizes = list(accumulate(map(len, runs)))
    for count in range(len(runs), 0, -1):
        size = sizes[count - 1]
        if size > 19:
            continue
        if size < 13:
            break
        digits = "".join(runs[:count])
        if _card_prefix_ok(digits) and len(set(digits)) > 1 and _luhn(digits):
            return start + size + count - 1
    return -1


SSN_CUE_DISTANCE = 30  # the cue ends at most this many characters before the number
_SSN_CUE_LONGEST = 16  # "social_security" and a little
# What names an SSN: "SSN", "social security", "soc sec", "SS#" (any case), searched up to
# the number (the end of the search is the end of the string for `\Z`).
_SSN_CUE = re.compile(
    r"(?i:(?<![A-Za-z])ssns?(?![A-Za-z])|social[ _-]?security|(?<![A-Za-z])soc\.?[ _-]?sec"
    rf"|(?<![A-Za-z])ss ?#)(?=[\s\S]{{0,{SSN_CUE_DISTANCE}}}\Z)"
)


def validate_ssn(text: str, start: int, end: int) -> int:
    """Area, group and serial in the ranges ever issued. `123-45-6789` is an SSN wherever
    it stands; `123 45 6789` (one or two spaces) is many things, so only after a cue and
    not inside a longer run of digit groups."""
    if text[start + 3] != "-" and not _spaced_ssn_ok(text, start, end):
        return -1
    area, group, serial = text[start:end].replace("-", " ").split()
    if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
        return -1
    return end


def _spaced_ssn_ok(text: str, start: int, end: int) -> bool:
    if text[start - 2 : start - 1].isdigit() or text[end + 1 : end + 2].isdigit():
        return False  # "… 4 711 44 9981 …": one group of a longer number
    lo = max(0, start - SSN_CUE_DISTANCE - _SSN_CUE_LONGEST)
    return _SSN_CUE.search(text, lo, start) is not None


# ISO 13616 registry: country code → IBAN length.
IBAN_LENGTHS = MappingProxyType({
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32,
    "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31,
    "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28, "TL": 23,
    "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
})  # fmt: skip


def iban_checksum_ok(iban: str) -> bool:
    """ISO 7064 mod 97-10 on a compact, upper-case IBAN."""
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def validate_iban(text: str, start: int, end: int) -> int:
    """The country's IBAN length decides where the IBAN ends; it must end at a group
    boundary and pass mod-97."""
    length = IBAN_LENGTHS.get(text[start : start + 2])
    if length is None:
        return -1
    seen, stop = 0, start
    while stop < end and seen < length:
        if text[stop] != " ":
            seen += 1
        stop += 1
    if seen < length or (stop < len(text) and text[stop].isalnum()):
        return -1
    return stop if iban_checksum_ok(text[start:stop].replace(" ", "")) else -1


def validate_ipv4(text: str, start: int, end: int) -> int:
    return end if all(int(octet) <= 255 for octet in text[start:end].split(".")) else -1


def validate_ipv6(text: str, start: int, end: int) -> int:
    """Parsed by `ipaddress`. Shapes that are more often code than addresses (`a[1::2]`,
    `x[::2]`) are refused: at least two groups, one of them 3+ characters, or `::1`."""
    candidate = text[start:end]
    if candidate.endswith(":") and not candidate.endswith("::"):
        candidate, end = candidate[:-1], end - 1  # "fe80::1: ..." in a sentence
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return -1
    groups = [g for g in candidate.split(":") if g]
    if candidate == "::1" or (
        len(groups) >= 2 and (len(groups) >= 3 or max(map(len, groups)) >= 3)
    ):
        return end
    return -1


def validate_phone(text: str, start: int, end: int) -> int:
    digits = sum(ch.isdigit() for ch in text[start:end])
    if text[start] == "+":
        return end if 8 <= digits <= 15 else -1
    return end if 10 <= digits <= 12 else -1


def validate_token(text: str, start: int, end: int) -> int:
    """A bearer token has a digit in it or is long: `bearer instruments` is prose."""
    if end - start >= 20 or any(ch.isdigit() for ch in text[start:end]):
        return end
    return -1


# --- branches ----------------------------------------------------------------------------

_W = "[A-Za-z0-9_]"  # ASCII word character
_LATIN = "À-ÖØ-öø-ɏ"  # accented Latin letters: U+00C0-U+024F but U+00D7 and U+00F7
_B = "[A-Za-z0-9]"  # keywords may follow `_` (DB_PASSWORD, OPENAI_API_KEY), not a letter
_TOKEN = "[A-Za-z0-9_-]"
_TOKEN_END = "(?![A-Za-z0-9_-])"
_NUM = "[A-Za-z0-9_.+-]"  # a number does not start right after one of these
_NUM_END = "(?![A-Za-z0-9_]|[.-][0-9])"  # nor is it followed by a letter, a digit, .5 or -5

# What the scan stops at for e-mails, URL credentials and `key: value` assignments (one
# pass over the word serves the three): a word followed by `@`, by `://`, or by `:` / `=`
# (after an optional quote and spaces) when it ends like a keyword (passwORD, passSWD,
# PWD, passphrASE, api_KEY, secRET, toKEN).
_WORD_SCAN = (
    rf"(?:[A-Za-z0-9{_LATIN}]|[_%+-](?<![A-Za-z0-9._%+{_LATIN}-][_%+-]))"  # as an e-mail starts
    rf"[A-Za-z0-9._%+{_LATIN}-]{{0,63}}+"
    r"(?:@|://[^\s/:@]{1,64}+:[^\s/@]{1,256}+@"
    r"""|(?=\\?["']?[ \t]{0,3}[:=])(?<=(?i:ord|swd|pwd|ase|key|ret|ken)))"""
)
_ASSIGN = r"""\\?["']?[ \t]{0,3}[:=][ \t]{0,3}\\?["']?"""  # `=`, `: `, `": "`, `\": \"`
_VALUE = r"""[^\s"'`,;&<>(){}\[\]\\]{1,4096}+"""
_TOKEN_CHARS = "[A-Za-z0-9._~+/-]{8,4096}+={0,2}"
# base64 lines (also with `\n` escapes, inside JSON), headers such as `Proc-Type: 4,ENCRYPTED`
_PEM_BODY = r"(?:[A-Za-z0-9+/=\r\n\t\\,.:]{1,65536}+|(?<=:) |-(?!-)){0,64}+"
_PEM_LABEL = "(?:[A-Z0-9]{1,16} ){0,4}PRIVATE KEY(?: BLOCK)?-----"


def _keyword(first: str, rest: str) -> Branch:
    """`<keyword><:|=><value>`: the value is masked."""
    return _branch(
        f"secret_kv_{first[1]}",
        "secret",
        first,
        _B,
        f"(?i:{rest}){_ASSIGN}(?P<kv_{first[1]}>{_VALUE})",
        value=f"kv_{first[1]}",
        scan=_WORD_SCAN,
    )


BUILTIN_BRANCHES: tuple[Branch, ...] = (
    # --- secrets
    _branch(  # a PEM private key block, through END (or through its body when END is cut off)
        "secret_pem", "secret", "-", "-",
        f"----BEGIN {_PEM_LABEL}{_PEM_BODY}(?:-----END {_PEM_LABEL})?",
        scan="-(?<=--)(?<!---)---BEGIN ", at_anchor=True,
    ),
    _branch(  # sk-..., sk-proj-..., sk-ant-api03-...
        "secret_openai", "secret", "s", _TOKEN, "k-[A-Za-z0-9_-]{20,512}+" + _TOKEN_END, "k-"
    ),
    _branch(  # sk_live_, pk_live_, rk_live_, sk_test_, ...
        "secret_stripe", "secret", "[spr]", _TOKEN,
        "k_(?:live|test)_[A-Za-z0-9]{10,247}+" + _TOKEN_END, "k_",
    ),
    _branch("secret_aws_id", "secret", "A", _B, "(?:KIA|SIA)[A-Z0-9]{16}(?![A-Za-z0-9])", "[KS]IA"),
    _branch(
        "secret_aws_key", "secret", "[Aa]", _B,
        f"(?i:ws[_-]?secret[_-]?(?:access[_-]?)?key){_ASSIGN}"
        "(?P<aws_v>[A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])",
        value="aws_v", scan=_WORD_SCAN,
    ),
    _branch(  # ghp_, gho_, ghu_, ghs_, ghr_, github_pat_
        "secret_github", "secret", "g", _W,
        "(?:h[pousr]_[A-Za-z0-9]{36,251}+|ithub_pat_[A-Za-z0-9_]{22,240}+)(?![A-Za-z0-9_])",
        "h[pousr]_|ithub_pat_",
    ),
    _branch(
        "secret_slack", "secret", "x", _TOKEN, "ox[baprs]-[A-Za-z0-9-]{10,250}+" + _TOKEN_END, "ox"
    ),
    _branch("secret_google", "secret", "A", _TOKEN, "Iza[0-9A-Za-z_-]{35}" + _TOKEN_END, "Iza"),
    _branch(
        "secret_jwt", "secret", "e", _TOKEN,
        r"yJ[A-Za-z0-9_-]{4,4096}+\.[A-Za-z0-9_-]{4,8192}+\.[A-Za-z0-9_-]{4,4096}+" + _TOKEN_END,
        "yJ",
    ),
    _branch(  # Authorization: Bearer <token> (or Basic, Token, Bot, or no scheme)
        "secret_auth", "secret", "[Aa]", _B,
        f"(?i:uthorization){_ASSIGN}(?:(?i:bearer|basic|token|bot)[ \t]{{1,3}})?"
        f"(?P<auth_v>{_TOKEN_CHARS})",
        peek="(?i:uthorization)", value="auth_v", validate=validate_token,
        scan="[Aa](?i:uthorization)",
    ),
    _branch(
        "secret_bearer", "secret", "[Bb]", _B,
        f"(?i:earer)[ \t]{{1,3}}(?P<bearer_v>{_TOKEN_CHARS})",
        peek="(?i:earer)[ \t]", value="bearer_v", validate=validate_token,
    ),
    _keyword("[Pp]", "assword|asswd|assphrase|wd|rivate[_-]?key"),
    _keyword("[Ss]", "ecret(?:[_-]?(?:access[_-]?)?key)?"),
    _keyword("[Tt]", "oken"),
    _keyword("[Aa]", "pi[_-]?(?:key|token|secret)|ccess[_-]?(?:token|key)|uth[_-]?token|pp[_-]?secret"),
    _keyword("[Cc]", "lient[_-]?secret"),
    _keyword("[Rr]", "efresh[_-]?token"),
    _keyword("[Ii]", "d[_-]?token"),
    _branch(  # scheme://user:PASSWORD@host
        "secret_url", "secret", "[A-Za-z]", "[A-Za-z0-9+.-]",
        r"[A-Za-z0-9+.-]{1,19}+://[^\s/:@]{1,64}+:(?P<url_v>[^\s/@]{1,256}+)@",
        value="url_v", scan=_WORD_SCAN,
    ),
    # --- e-mail
    _branch(  # Latin letters with accents too (müller@bücher.de); not after `//` (URL userinfo)
        "email", "email", f"[A-Za-z0-9_%+{_LATIN}-]", f"[A-Za-z0-9._%+{_LATIN}-]",
        rf"(?<!//[\s\S])[A-Za-z0-9._%+{_LATIN}-]{{0,63}}+@(?:[A-Za-z0-9{_LATIN}-]{{1,63}}+\.){{1,8}}"
        rf"[A-Za-z]{{2,24}}+(?![A-Za-z0-9{_LATIN}-])",
        scan=_WORD_SCAN,
    ),
    # --- IBAN, card, SSN
    _branch(
        "iban", "iban", "[A-Z]", _W,
        r"[A-Z][0-9]{2}(?: ?[A-Z0-9]{4}+){2,8}+(?: ?[A-Z0-9]{1,3}+)?+(?![A-Za-z0-9_])",
        peek="[A-Z][0-9]{2}", validate=validate_iban,
    ),
    _branch(  # 13-19 digits, or a group of 4 then groups of 3-6 with one kind of separator
        "card", "credit_card", "[0-9]", _NUM,
        r"(?:[0-9]{12,18}+|[0-9]{3}(?=(?:[ -]?[0-9]){9})(?P<card_sep>[ -])[0-9]{3,6}+"
        # groups may be given back (not possessive): `4111 1111 1111 1111 000A` is the card
        # and a word, not a run that fails the boundary as a whole (at most 7 steps back)
        r"(?:(?P=card_sep)[0-9]{3,6}+(?![0-9])){0,7})(?![A-Za-z0-9_])",
        peek="[0-9]{3}", validate=validate_card,
    ),
    _branch(  # 123-45-6789; 123 45 6789 (validate_ssn wants a cue before it)
        "ssn", "ssn", "[0-9]", _NUM,
        r"[0-9]{2}(?:-[0-9]{2}-| {1,2}[0-9]{2} {1,2})[0-9]{4}" + _NUM_END,
        peek="[0-9]{2}[ -]", validate=validate_ssn,
    ),
    # --- IP addresses
    _branch(
        "ipv4", "ip", "[0-9]", "[A-Za-z0-9_.]",
        r"[0-9]{0,2}+\.[0-9]{1,3}+\.[0-9]{1,3}+\.[0-9]{1,3}+(?![A-Za-z0-9_]|\.[0-9])",
        peek=r"[0-9]{0,2}+\.[0-9]", validate=validate_ipv4,
    ),
    _branch(  # a cheap shape (two colons within the first two groups); ipaddress decides.
        # Not inside a run of colons and hex digits (`a:b:...`, `2001:db8:::1`).
        "ipv6", "ip", "[0-9A-Fa-f:]", "[A-Za-z0-9_.]",
        r"(?<![0-9A-Fa-f:]:[\s\S])(?<!::)"
        r"[0-9A-Fa-f:]{0,44}+(?:\.[0-9]{1,3}+){0,3}+(?![A-Za-z0-9_]|:[0-9A-Fa-f:])",
        peek="[0-9A-Fa-f]{0,3}+:[0-9A-Fa-f]{0,4}+:|(?<=:)[0-9A-Fa-f]{0,4}+:",
        validate=validate_ipv6,
    ),
    # --- phone numbers
    _branch(  # +14155552671, +44 20 7946 0958, +1 (415) 555-2671, +33 1 23 45 67 89
        "phone_intl", "phone", r"\+", "[A-Za-z0-9_+]",
        r"[1-9][0-9]{0,14}+"
        r"(?:(?:[ .-]?\([0-9]{1,4}+\)[ .-]?|[ .-])[0-9]{1,12}+){0,6}+(?![A-Za-z0-9_])",
        peek=r"(?:[ .()-]{0,3}[0-9]){8}", validate=validate_phone,
    ),
    _branch(  # (415) 555-2671
        "phone_nanp_paren", "phone", r"\(", _W,
        r"[2-9][0-9]{2}\)[ .-]?[2-9][0-9]{2}[ .-][0-9]{4}" + _NUM_END,
        peek=r"[2-9][0-9]{2}\)", validate=validate_phone,
    ),
    _branch(  # 415-555-2671, 415.555.2671, 415 555 2671 (one separator throughout)
        "phone_nanp", "phone", "[2-9]", _NUM,
        r"[0-9]{2}(?P<nanp_sep>[ .-])[2-9][0-9]{2}(?P=nanp_sep)[0-9]{4}" + _NUM_END,
        peek="[0-9]{2}[ .-][2-9]", validate=validate_phone,
    ),
    _branch(  # 1-800-555-0199
        "phone_nanp_1", "phone", "1", _NUM,
        r"(?P<nanp1_sep>[ .-])[2-9][0-9]{2}(?P=nanp1_sep)[2-9][0-9]{2}(?P=nanp1_sep)[0-9]{4}"
        + _NUM_END,
        peek="[ .-][2-9]", validate=validate_phone,
    ),
    _branch(  # national, trunk prefix 0: 020 7946 0958, 07700 900123, 030 12345678, 02 9876 5432
        "phone_trunk", "phone", "0", _NUM,
        r"[1-9][0-9]{0,4}+[ -][0-9]{3,8}+(?:[ -][0-9]{3,4}+)?+" + _NUM_END,
        peek="[1-9]", validate=validate_phone,
    ),
    _branch(  # (020) 7946 0958, (02) 9876 5432
        "phone_trunk_paren", "phone", r"\(", _W,
        r"0[1-9][0-9]{0,4}+\)[ -]?[0-9]{3,8}+(?:[ -][0-9]{3,4}+)?+" + _NUM_END,
        peek="0[1-9]", validate=validate_phone,
    ),
    _branch(  # 01 23 45 67 89, 06.12.34.56.78
        "phone_fr", "phone", "0", _NUM, r"[1-9](?:[ .][0-9]{2}){4}" + _NUM_END,
        peek="[1-9][ .]", validate=validate_phone,
    ),
)  # fmt: skip

# --- normalisation for hash tags ---------------------------------------------------------


def normalize(kind: str, value: str) -> str:
    """The form that is hashed, so that one value written two ways gets one tag: e-mails
    lower-cased; phones, cards, SSNs and IBANs without separators (IBANs upper-cased); IP
    addresses in their canonical form; anything else as written."""
    if kind == "email":
        return value.lower()
    if kind in ("phone", "credit_card", "ssn", "iban"):
        return "".join(ch for ch in value if ch.isalnum()).upper()
    if kind == "ip":
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            return value
    return value
