"""Built-in PII and secret detectors: regex branches, their validators, and value normalisation."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

DETECTOR_TYPES = ("email", "phone", "credit_card", "ssn", "iban", "ip", "secret")

# A validator sees the whole text and the span that would be masked; it returns the end of
# the span it accepts (the same end, or an earlier one to trim a candidate), or -1 to reject.
Validator = Callable[[str, int, int], int]


@dataclass(frozen=True, slots=True)
class Branch:
    """One alternative of the combined pattern."""

    name: str  # group name in the combined pattern, unique
    kind: str  # the detector type it reports (a DETECTOR_TYPES entry or a custom name)
    pattern: str  # regex source; bounded or possessive repetitions only
    value: str | None = None  # group that is masked (e.g. the value of `password=`); None: all
    validate: Validator | None = None


def _lead(first: str, not_after: str) -> str:
    """`first` (one character class) not preceded by a character of `not_after`.

    The lookbehind comes after the first character so that the regex engine's branch
    dispatch can reject a position on its first character alone."""
    return f"{first}(?<!{not_after}[\\s\\S])"


_W = "[A-Za-z0-9_]"  # ASCII word character
_TOKEN_END = "(?![A-Za-z0-9_-])"
_NUM_END = "(?![A-Za-z0-9_]|[.-][0-9])"  # not followed by a letter, digit, or .5 / -5
_NOT_NUM = "[A-Za-z0-9_.+-]"  # a number does not start right after one of these

# --- validators --------------------------------------------------------------------------


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


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


def _card_ok(digits: str, runs: list[str]) -> bool:
    if not 13 <= len(digits) <= 19 or not _card_prefix_ok(digits):
        return False
    if len(runs) > 1 and not all(3 <= len(r) <= 6 for r in runs):
        return False  # grouped numbers come in groups of 3 to 6 (4-4-4-4, 4-6-5, ...)
    return len(set(digits)) > 1 and _luhn(digits)


def validate_card(text: str, start: int, end: int) -> int:
    """The longest prefix of the digit groups that is a valid card (so that `4111 1111 1111
    1111 2026` masks the card and keeps the year)."""
    runs = text[start:end].replace("-", " ").split(" ")
    while runs:
        if _card_ok("".join(runs), runs):
            return start + sum(len(r) for r in runs) + len(runs) - 1
        runs.pop()
    return -1


def validate_ssn(text: str, start: int, end: int) -> int:
    area, group, serial = text[start : start + 3], text[start + 4 : start + 6], text[start + 7 : end]
    if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
        return -1
    return end


# ISO 13616 registry: country code → IBAN length.
IBAN_LENGTHS = {
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
}  # fmt: skip


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
    if candidate == "::1" or (len(groups) >= 2 and (len(groups) >= 3 or max(map(len, groups)) >= 3)):
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

_EMAIL = (
    _lead("[A-Za-z0-9_%+-]", "[A-Za-z0-9._%+-]")
    + r"[A-Za-z0-9._%+-]{0,63}+@(?:[A-Za-z0-9-]{1,63}+\.){1,8}[A-Za-z]{2,24}+(?![A-Za-z0-9-])"
)

_PHONE_INTL = (  # +14155552671, +44 20 7946 0958, +1 (415) 555-2671, +33 1 23 45 67 89
    _lead(r"\+", "[A-Za-z0-9_+]")
    + r"[1-9][0-9]{0,14}+(?:(?:[ .-]?\([0-9]{1,4}+\)[ .-]?|[ .-])[0-9]{1,12}+){0,6}+"
    + "(?![A-Za-z0-9_])"
)
_PHONE_NANP_PAREN = (  # (415) 555-2671
    _lead(r"\(", _W) + r"[2-9][0-9]{2}\)[ .-]?[2-9][0-9]{2}[ .-][0-9]{4}" + _NUM_END
)
_PHONE_NANP = (  # 415-555-2671, 415.555.2671, 415 555 2671 (one separator throughout)
    _lead("[2-9]", _NOT_NUM)
    + r"[0-9]{2}(?P<nanp_sep>[ .-])[2-9][0-9]{2}(?P=nanp_sep)[0-9]{4}"
    + _NUM_END
)
_PHONE_NANP_1 = (  # 1-800-555-0199
    _lead("1", _NOT_NUM)
    + r"(?P<nanp1_sep>[ .-])[2-9][0-9]{2}(?P=nanp1_sep)[2-9][0-9]{2}(?P=nanp1_sep)[0-9]{4}"
    + _NUM_END
)
_PHONE_TRUNK = (  # national with trunk 0: 020 7946 0958, 07700 900123, 030 12345678
    _lead("0", _NOT_NUM) + r"[1-9][0-9]{1,4}+[ -][0-9]{3,8}+(?:[ -][0-9]{3,4}+)?+" + _NUM_END
)
_PHONE_FR = _lead("0", _NOT_NUM) + r"[1-9](?:[ .][0-9]{2}){4}" + _NUM_END  # 01 23 45 67 89

_CARD = (  # up to ten digit groups; the validator keeps the longest prefix that is a card
    _lead("[0-9]", _NOT_NUM)
    + r"[0-9]{0,18}+(?![A-Za-z0-9_])(?:[ -][0-9]{1,19}+(?![A-Za-z0-9_])){0,9}+"
)
_SSN = _lead("[0-9]", _NOT_NUM) + r"[0-9]{2}-[0-9]{2}-[0-9]{4}" + _NUM_END
_IBAN = (
    _lead("[A-Z]", "[A-Za-z0-9_]")
    + r"[A-Z][0-9]{2}(?: ?[A-Z0-9]{4}+){2,8}+(?: ?[A-Z0-9]{1,3}+)?+(?![A-Za-z0-9_])"
)
_IPV4 = (
    _lead("[0-9]", "[A-Za-z0-9_.]")
    + r"[0-9]{0,2}+\.[0-9]{1,3}+\.[0-9]{1,3}+\.[0-9]{1,3}+(?![A-Za-z0-9_]|\.[0-9])"
)
_IPV6 = (  # a cheap shape (two colons within the first two groups); ipaddress decides
    r"(?=[0-9A-Fa-f]{0,4}+:[0-9A-Fa-f]{0,4}+:)"
    + _lead("[0-9A-Fa-f:]", "[A-Za-z0-9_.]")
    + r"[0-9A-Fa-f:]{1,44}+(?:\.[0-9]{1,3}+){0,3}+(?![A-Za-z0-9_])"
)

_B = "[A-Za-z0-9]"  # keywords: may follow `_` (DB_PASSWORD, OPENAI_API_KEY), not a letter
_ASSIGN = r"""\\?["']?[ \t]{0,3}[:=][ \t]{0,3}\\?["']?"""
_VALUE = r"""[^\s"'`,;&<>(){}\[\]\\]{1,256}+"""
_KEYWORD = (
    "(?:"
    + _lead("[Pp]", _B) + "(?i:assword|asswd|assphrase|wd|rivate[_-]?key)"
    + "|" + _lead("[Ss]", _B) + "(?i:ecret(?:[_-]?(?:access[_-]?)?key)?)"
    + "|" + _lead("[Tt]", _B) + "(?i:oken)"
    + "|" + _lead("[Aa]", _B)
    + "(?i:pi[_-]?(?:key|token|secret)|ccess[_-]?(?:token|key)|uth[_-]?token|pp[_-]?secret)"
    + "|" + _lead("[Cc]", _B) + "(?i:lient[_-]?secret)"
    + "|" + _lead("[Rr]", _B) + "(?i:efresh[_-]?token)"
    + "|" + _lead("[Ii]", _B) + "(?i:d[_-]?token)"
    + ")"
)  # fmt: skip
_TOKEN_CHARS = "[A-Za-z0-9._~+/-]{8,4096}+={0,2}"

_SECRETS = (
    ("secret_pem", _lead("-", "-")  # a PEM private key block, through END (or to its last line)
     + r"----BEGIN (?:[A-Z0-9]{1,16} ){0,4}PRIVATE KEY(?: BLOCK)?-----"
     + r"[A-Za-z0-9+/=\s:,.\\]{0,65536}+(?:-(?!-)[A-Za-z0-9+/=\s:,.\\]{0,65536}+){0,16}+"
     + r"(?:-----END (?:[A-Z0-9]{1,16} ){0,4}PRIVATE KEY(?: BLOCK)?-----)?", None, None),
    ("secret_openai", _lead("s", "[A-Za-z0-9_-]") + "k-[A-Za-z0-9_-]{20,512}+" + _TOKEN_END,
     None, None),  # sk-..., sk-proj-..., sk-ant-api03-...
    ("secret_stripe", _lead("[spr]", "[A-Za-z0-9_-]") + "k_(?:live|test)_[A-Za-z0-9]{10,247}+"
     + _TOKEN_END, None, None),
    ("secret_aws_id", _lead("A", _B) + "(?:KIA|SIA)[A-Z0-9]{16}(?![A-Za-z0-9])", None, None),
    ("secret_aws_key", _lead("[Aa]", _B) + "(?i:ws[_-]?secret[_-]?(?:access[_-]?)?key)"
     + _ASSIGN + "(?P<aws_v>[A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])", "aws_v", None),
    ("secret_github", _lead("g", "[A-Za-z0-9_]")
     + "(?:h[pousr]_[A-Za-z0-9]{36,251}+|ithub_pat_[A-Za-z0-9_]{22,240}+)(?![A-Za-z0-9_])",
     None, None),
    ("secret_slack", _lead("x", "[A-Za-z0-9_-]") + "ox[baprs]-[A-Za-z0-9-]{10,250}+" + _TOKEN_END,
     None, None),
    ("secret_google", _lead("A", "[A-Za-z0-9_-]") + "Iza[0-9A-Za-z_-]{35}" + _TOKEN_END,
     None, None),
    ("secret_jwt", _lead("e", "[A-Za-z0-9_-]")
     + r"yJ[A-Za-z0-9_-]{4,4096}+\.[A-Za-z0-9_-]{4,8192}+\.[A-Za-z0-9_-]{4,4096}+" + _TOKEN_END,
     None, None),
    ("secret_auth", _lead("[Aa]", _B) + "(?i:uthorization)" + _ASSIGN
     + "(?:(?i:bearer|basic|token|bot)[ \t]{1,3})?(?P<auth_v>" + _TOKEN_CHARS + ")",
     "auth_v", validate_token),
    ("secret_bearer", _lead("[Bb]", _B) + "(?i:earer)[ \t]{1,3}(?P<bearer_v>" + _TOKEN_CHARS + ")",
     "bearer_v", validate_token),
    ("secret_assign", _KEYWORD + _ASSIGN + "(?P<kv_v>" + _VALUE + ")", "kv_v", None),
    ("secret_url", _lead("[A-Za-z]", "[A-Za-z0-9+.-]")  # scheme://user:PASSWORD@host
     + r"[A-Za-z0-9+.-]{1,19}+://[^\s/:@]{1,64}+:(?P<url_v>[^\s/@]{1,128}+)@", "url_v", None),
)  # fmt: skip

BUILTIN_BRANCHES: tuple[Branch, ...] = (
    *(Branch(name, "secret", pattern, value, check) for name, pattern, value, check in _SECRETS),
    Branch("email", "email", _EMAIL),
    Branch("iban", "iban", _IBAN, validate=validate_iban),
    Branch("card", "credit_card", _CARD, validate=validate_card),
    Branch("ssn", "ssn", _SSN, validate=validate_ssn),
    Branch("ipv4", "ip", _IPV4, validate=validate_ipv4),
    Branch("ipv6", "ip", _IPV6, validate=validate_ipv6),
    Branch("phone_intl", "phone", _PHONE_INTL, validate=validate_phone),
    Branch("phone_nanp_paren", "phone", _PHONE_NANP_PAREN, validate=validate_phone),
    Branch("phone_nanp", "phone", _PHONE_NANP, validate=validate_phone),
    Branch("phone_nanp_1", "phone", _PHONE_NANP_1, validate=validate_phone),
    Branch("phone_trunk", "phone", _PHONE_TRUNK, validate=validate_phone),
    Branch("phone_fr", "phone", _PHONE_FR, validate=validate_phone),
)

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
