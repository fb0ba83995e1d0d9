"""Labelled redaction corpus: PII and secrets in varied sentences, and benign sentences full of numbers."""

from __future__ import annotations

import base64
import random
import string
import uuid
from dataclasses import dataclass
from itertools import cycle


@dataclass(frozen=True)
class Example:
    text: str
    kind: str  # the detector expected to fire
    secret: str  # the exact substring that must be gone from the output


# --- value builders --------------------------------------------------------------------


def luhn_complete(partial: str) -> str:
    """`partial` with its Luhn check digit appended."""
    total = 0
    for i, ch in enumerate(reversed(partial)):
        d = int(ch)
        if i % 2 == 0:  # doubled: the check digit will sit to the right
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return partial + str((10 - total % 10) % 10)


def card_number(rng: random.Random, prefix: str, length: int) -> str:
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    return luhn_complete(body)


def iban(country: str, bban: str) -> str:
    """The IBAN for `bban`, its two check digits computed (ISO 7064 mod 97-10)."""
    numeric = int("".join(str(int(ch, 36)) for ch in bban + country + "00"))
    return f"{country}{98 - numeric % 97:02d}{bban}"


def grouped(value: str, size: int = 4, sep: str = " ") -> str:
    return sep.join(value[i : i + size] for i in range(0, len(value), size))


def _chars(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


_ALNUM = string.ascii_letters + string.digits
_B64URL = _ALNUM + "-_"

# BBAN layouts: n digit, a upper-case letter, c upper-case letter or digit.
_BBAN = {
    "DE": "18n", "GB": "4a14n", "FR": "23n", "ES": "20n", "IT": "1a10n12c", "NL": "4a10n",
    "BE": "12n", "CH": "17n", "AT": "16n", "PL": "24n", "SE": "20n", "NO": "11n", "PT": "21n",
    "IE": "4a14n", "DK": "14n", "FI": "14n",
}  # fmt: skip


def _bban(rng: random.Random, layout: str) -> str:
    out, number = [], ""
    for ch in layout:
        if ch.isdigit():
            number += ch
            continue
        alphabet = {"n": string.digits, "a": string.ascii_uppercase}.get(
            ch, string.ascii_uppercase + string.digits
        )
        out.append(_chars(rng, alphabet, int(number)))
        number = ""
    return "".join(out)


# --- PII and secrets -------------------------------------------------------------------

_FIRST = ["alice", "bob", "carol", "dmitri", "eve", "farah", "gustavo", "hana", "josé", "jules"]
_LAST = ["smith", "nguyen", "okafor", "müller", "garcia", "kowalski", "tanaka", "dubois", "rossi"]
_DOMAINS = [
    "example.com", "mail.example.co.uk", "corp.acme.io", "gmail.com", "outlook.fr",
    "uni-heidelberg.de", "startup.dev", "health.example.org", "eu.company.net",
]  # fmt: skip

_EMAIL_TEMPLATES = [
    "Please forward the signed contract to {v} before Friday.",
    "My email is {v} if you need anything else.",
    "cc {v} on the incident thread, she owns the runbook.",
    "From: Support Team <{v}>",
    'user = {{"name": "Jo", "email": "{v}", "plan": "pro"}}',
    "Can you draft a polite reply to {v} declining the meeting?",
    "Reach me at {v}, thanks!",
    "mailto:{v}?subject=Invoice%2042",
    "(backup contact: {v})",
    "The login failed for {v} three times at 09:14 UTC.",
    "Send the Q3 numbers to {v}; the board meets on the 14th.",
    "{v} wrote: the staging deploy is broken again",
]


def _emails(rng: random.Random) -> list[Example]:
    out = []
    shapes = [
        "{f}.{l}", "{f}_{l}", "{f}{n}", "{f}.{l}+billing", "{F}.{L}", "{f}-{l}", "{l}.{f}{n}",
        "{f}",
    ]  # fmt: skip
    templates = cycle(_EMAIL_TEMPLATES)
    for i in range(44):
        first, last = _FIRST[i % len(_FIRST)], _LAST[(i * 7) % len(_LAST)]
        local = shapes[i % len(shapes)].format(
            f=first, l=last, F=first.capitalize(), L=last.capitalize(), n=rng.randint(1, 99)
        )
        value = f"{local}@{_DOMAINS[(i * 5) % len(_DOMAINS)]}"
        out.append(Example(next(templates).format(v=value), "email", value))
    return out


_PHONE_TEMPLATES = [
    "Call me at {v} after 5pm.",
    "Phone: {v}",
    "my cell is {v}, text first please",
    "You can reach the front desk on {v}.",
    "tel:{v}",
    "Customer called from {v} about order 5521.",
    "Emergency contact — {v} (mother)",
    "Please update my number to {v}.",
    '{{"name": "R. Patel", "phone": "{v}"}}',
    "Leave a voicemail at {v} if nobody picks up.",
]


def _phones(rng: random.Random) -> list[Example]:
    def d(n: int) -> str:
        return _chars(rng, string.digits, n)

    def nanp() -> tuple[str, str, str]:
        return str(rng.randint(2, 9)) + d(2), str(rng.randint(2, 9)) + d(2), d(4)

    makers = [
        lambda: "({}) {}-{}".format(*nanp()),
        lambda: "{}-{}-{}".format(*nanp()),
        lambda: "{}.{}.{}".format(*nanp()),
        lambda: "+1 {} {} {}".format(*nanp()),
        lambda: "+1-{}-{}-{}".format(*nanp()),
        lambda: "+1{}{}{}".format(*nanp()),
        lambda: f"1-800-{str(rng.randint(2, 9)) + d(2)}-{d(4)}",
        lambda: f"+44 20 {d(4)} {d(4)}",
        lambda: f"020 {d(4)} {d(4)}",
        lambda: f"07700 900{d(3)}",
        lambda: f"+44 7700 900{d(3)}",
        lambda: f"+33 1 {d(2)} {d(2)} {d(2)} {d(2)}",
        lambda: f"01 {d(2)} {d(2)} {d(2)} {d(2)}",
        lambda: f"06.{d(2)}.{d(2)}.{d(2)}.{d(2)}",
        lambda: f"+49 30 {d(8)}",
        lambda: f"030 {d(8)}",
        lambda: f"+91 98{d(3)} {d(5)}",
        lambda: f"+61 2 {d(4)} {d(4)}",
        lambda: f"+81 3-{d(4)}-{d(4)}",
        lambda: f"+55 11 9{d(4)}-{d(4)}",
        lambda: f"+4420{d(8)}",
        lambda: f"+44 (0)20 {d(4)} {d(4)}",
        lambda: f"(020) {d(4)} {d(4)}",
        lambda: f"02 {d(4)} {d(4)}",
        lambda: "{} {} {}".format(*nanp()),
        lambda: "+1 ({}) {}-{}".format(*nanp()),
        lambda: f"+86 138 {d(4)} {d(4)}",
        lambda: f"+7 495 {d(3)}-{d(2)}-{d(2)}",
        lambda: f"+34 612 {d(2)} {d(2)} {d(2)}",
    ]
    templates = cycle(_PHONE_TEMPLATES)
    return [
        Example(next(templates).format(v=(value := makers[i % len(makers)]())), "phone", value)
        for i in range(48)
    ] + [  # known gap, kept to be measured: ten bare digits look like any order number
        Example(f"text me on {(value := ''.join(nanp()))} tonight", "phone", value)
    ]


_CARD_TEMPLATES = [
    "Card number: {v}, exp 04/27, CVC on the back.",
    "Please charge {v} for the $45.00 renewal.",
    "my visa is {v} can you check why it was declined",
    '{{"payment": {{"card": "{v}", "currency": "EUR"}}}}',
    "Refund issued to card {v} on 2024-03-02.",
    "The customer read out {v} over the phone.",
    "Use {v} 12/26 for the test order.",
]


def _cards(rng: random.Random) -> list[Example]:
    kinds = [  # prefix, length, grouping
        ("4", 16, (4, 4, 4, 4)), ("51", 16, (4, 4, 4, 4)), ("55", 16, (4, 4, 4, 4)),
        ("2221", 16, (4, 4, 4, 4)), ("34", 15, (4, 6, 5)), ("37", 15, (4, 6, 5)),
        ("6011", 16, (4, 4, 4, 4)), ("65", 16, (4, 4, 4, 4)), ("3528", 16, (4, 4, 4, 4)),
        ("36", 14, (4, 6, 4)), ("62", 19, (4, 4, 4, 4, 3)), ("4", 13, (4, 4, 5)),
    ]  # fmt: skip
    out = []
    templates = cycle(_CARD_TEMPLATES)
    for i in range(38):
        prefix, length, groups = kinds[i % len(kinds)]
        number = card_number(rng, prefix, length)
        style = i % 3
        if style == 2:
            value = number
        else:
            parts, pos = [], 0
            for size in groups:
                parts.append(number[pos : pos + size])
                pos += size
            value = (" " if style == 0 else "-").join(parts)
        out.append(Example(next(templates).format(v=value), "credit_card", value))
    return out


_SSN_TEMPLATES = [
    "SSN: {v}",
    "My social security number is {v}.",
    "Applicant {name}, SSN {v}, DOB 1984-07-02.",
    "ssn={v}&state=CA",
    "Verify that {v} matches the W-2 we have on file.",
    "The form lists {v} as the taxpayer id.",
]


def _ssns(rng: random.Random) -> list[Example]:
    out = []
    templates = cycle(_SSN_TEMPLATES)
    for i in range(28):
        area = rng.choice([n for n in range(1, 900) if n != 666])
        value = f"{area:03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"
        text = next(templates).format(v=value, name=_FIRST[i % len(_FIRST)].capitalize())
        out.append(Example(text, "ssn", value))
    # written with spaces (found when a cue stands before it)
    value = f"{rng.randint(100, 599)} {rng.randint(10, 99)} {rng.randint(1000, 9999)}"
    out.append(Example(f"ssn is {value} per the form", "ssn", value))
    return out


_SPACED_SSN_TEMPLATES = [
    "SSN: {v}",
    "Her social security number is {v}, please verify.",
    "Soc. Sec. {v} (on the W-2)",
    "SS# {v}",
    "applicant ssn  {v}",
    "Social-Security no. {v}; DOB 1990-01-01",
    '{{"ssn": "{v}", "state": "TX"}}',
    "Update the SOCIAL SECURITY field to {v} before filing.",
]


def _spaced_ssns() -> list[Example]:
    """SSNs written with one or two spaces, a cue before them. Their own generator, so that
    adding them changed none of the other examples."""
    rng = random.Random(1936)
    out = []
    for i, template in enumerate(_SPACED_SSN_TEMPLATES):
        area = rng.choice([n for n in range(1, 900) if n != 666])
        sep = "  " if i % 3 == 2 else " "
        value = f"{area:03d}{sep}{rng.randint(1, 99):02d}{sep}{rng.randint(1, 9999):04d}"
        out.append(Example(template.format(v=value), "ssn", value))
    return out


_IBAN_TEMPLATES = [
    "Please wire the deposit to IBAN {v} by Monday.",
    "IBAN: {v}",
    "Beneficiary account {v}, BIC DEUTDEFF.",
    "Rent goes to {v} on the 1st of each month.",
    '{{"iban": "{v}", "amount": 1250.00}}',
    "Can you check whether {v} is the right account for the refund?",
]


def _ibans(rng: random.Random) -> list[Example]:
    out = []
    countries = list(_BBAN)
    templates = cycle(_IBAN_TEMPLATES)
    for i in range(28):
        country = countries[i % len(countries)]
        compact = iban(country, _bban(rng, _BBAN[country]))
        value = compact if i % 2 else grouped(compact)
        out.append(Example(next(templates).format(v=value), "iban", value))
    return out


_IP_TEMPLATES = [
    "The server at {v} stopped answering health checks.",
    "Failed login from {v} (5 attempts).",
    "client_ip={v} method=GET path=/v1/models status=200",
    "Connect to [{v}]:8443 with the staging cert.",
    "X-Forwarded-For: {v}",
    "Block {v} in the firewall until the audit is done.",
    "ssh admin@{v} -p 2222",
    "The DNS record now points to {v}.",
]


def _ips(rng: random.Random) -> list[Example]:
    makers = [
        lambda: f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        lambda: f"192.168.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        lambda: f"172.{rng.randint(16, 31)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        lambda: (
            f"{rng.randint(11, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
        ),
        lambda: f"2001:db8:{rng.randint(0, 0xFFFF):x}::{rng.randint(1, 0xFFFF):x}",
        lambda: (
            f"fe80::{rng.randint(0, 0xFFFF):x}:{rng.randint(0, 0xFFFF):x}:{rng.randint(0, 0xFFFF):x}:{rng.randint(1, 0xFFFF):x}"
        ),
        lambda: ":".join(f"{rng.randint(0, 0xFFFF):04x}" for _ in range(8)),
        lambda: "::1",
        lambda: f"::ffff:192.0.2.{rng.randint(1, 254)}",
        lambda: (
            f"2606:4700:{rng.randint(0, 0xFFFF):x}::{rng.randint(0, 0xFFFF):x}:{rng.randint(1, 0xFFFF):x}"
        ),
    ]
    templates = cycle(_IP_TEMPLATES)
    return [
        Example(next(templates).format(v=(value := makers[i % len(makers)]())), "ip", value)
        for i in range(32)
    ]


def _pem(rng: random.Random, label: str) -> str:
    body = base64.b64encode(bytes(rng.randrange(256) for _ in range(rng.randint(120, 260))))
    lines = [body[i : i + 64].decode() for i in range(0, len(body), 64)]
    return "\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----"])


def _secrets(rng: random.Random) -> list[Example]:
    def jwt() -> str:
        header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=").decode()
        claims = f'{{"sub":"{rng.randint(1000, 9999)}","exp":{rng.randint(1_700_000_000, 1_800_000_000)}}}'
        payload = base64.urlsafe_b64encode(claims.encode()).rstrip(b"=").decode()
        return f"{header}.{payload}.{_chars(rng, _B64URL, 43)}"

    whole: list[tuple[str, str]] = [  # (template, value): the whole token is the secret
        ("Here is my key {v}, why does it return 401?", "sk-" + _chars(rng, _ALNUM, 48)),
        ("OPENAI_API_KEY={v}", "sk-proj-" + _chars(rng, _B64URL, 120)),
        ("client = OpenAI(api_key='{v}')", "sk-proj-" + _chars(rng, _B64URL, 64)),
        ("use {v} for the batch job", "sk-svcacct-" + _chars(rng, _B64URL, 60)),
        ("anthropic key: {v}", "sk-ant-api03-" + _chars(rng, _B64URL, 93) + "AA"),
        ("export ANTHROPIC_API_KEY={v}", "sk-ant-api03-" + _chars(rng, _B64URL, 93) + "AA"),
        ("the admin key {v} leaked in the logs", "sk-ant-admin01-" + _chars(rng, _B64URL, 80)),
        ("AWS access key id {v}", "AKIA" + _chars(rng, string.ascii_uppercase + "234567", 16)),
        ('"AccessKeyId": "{v}",', "ASIA" + _chars(rng, string.ascii_uppercase + "234567", 16)),
        ("aws configure set aws_access_key_id {v}", "AKIA" + _chars(rng, string.ascii_uppercase, 16)),
        ("git clone https://{v}@github.com/acme/api.git", "ghp_" + _chars(rng, _ALNUM, 36)),
        ("GITHUB_TOKEN={v}", "ghs_" + _chars(rng, _ALNUM, 36)),
        ("oauth token {v} expired", "gho_" + _chars(rng, _ALNUM, 36)),
        ("user-to-server token: {v}", "ghu_" + _chars(rng, _ALNUM, 36)),
        ("fine-grained PAT {v}", "github_pat_" + _chars(rng, _ALNUM + "_", 82)),
        ("slack bot token {v} in the config", "xoxb-" + f"{rng.randint(10**11, 10**12)}-{rng.randint(10**12, 10**13)}-" + _chars(rng, _ALNUM, 24)),
        ("SLACK_TOKEN={v}", "xoxp-" + f"{rng.randint(10**11, 10**12)}-{rng.randint(10**11, 10**12)}-" + _chars(rng, _ALNUM, 32)),
        ("stripe.api_key = {v}", "sk_live_" + _chars(rng, _ALNUM, 99)),
        ("test with {v} first", "sk_test_" + _chars(rng, _ALNUM, 24)),
        ("publishable key {v}", "pk_live_" + _chars(rng, _ALNUM, 24)),
        ("restricted key {v} for the webhook", "rk_live_" + _chars(rng, _ALNUM, 24)),
        ("maps key {v} is over quota", "AIza" + _chars(rng, _B64URL, 35)),
        ("https://maps.googleapis.com/maps/api/geocode/json?key={v}&address=Paris", "AIza" + _chars(rng, _B64URL, 35)),
        ("session cookie {v}", jwt()),
        ("decode this JWT: {v}", jwt()),
        ('{{"id_token_hint": "{v}"}}', jwt()),
        ("here is the deploy key:\n{v}\nplease add it to the runner", _pem(rng, "RSA PRIVATE KEY")),
        ("{v}", _pem(rng, "PRIVATE KEY")),
        ("ssh key\n{v}", _pem(rng, "OPENSSH PRIVATE KEY")),
        ("ec key: {v}", _pem(rng, "EC PRIVATE KEY")),
        ("encrypted: {v}", _pem(rng, "ENCRYPTED PRIVATE KEY")),
    ]  # fmt: skip
    valued: list[tuple[str, str]] = [  # (template, value): the value after the key is the secret
        ("password={v}", "hunter2"),
        ("DB_PASSWORD={v}", "S3cure!Passw0rd"),
        ("login with username admin and password: {v}", "correct-horse-battery-staple"),
        ('{{"username": "jo", "password": "{v}"}}', "Tr0ub4dor&3"),
        ("passwd: {v}", _chars(rng, _ALNUM, 14)),
        ("mysql -u root --password={v} shop", _chars(rng, _ALNUM, 12)),
        ("secret={v}", _chars(rng, _ALNUM, 32)),
        ("SECRET_KEY = '{v}'", _chars(rng, _ALNUM + "!@#$%^*", 50)),
        ("client_secret: {v}", _chars(rng, _ALNUM, 40)),
        ("token={v}", _chars(rng, _ALNUM, 40)),
        ("https://api.example.com/v2/items?token={v}&page=2", _chars(rng, _ALNUM, 32)),
        ("refresh_token: {v}", _chars(rng, _B64URL, 64)),
        ("api_key={v}", _chars(rng, string.hexdigits.lower()[:16], 32)),
        ("X-Api-Key: {v}", _chars(rng, _ALNUM, 40)),
        ('headers = {{"x-api-key": "{v}"}}', _chars(rng, _ALNUM, 36)),
        ("APIKEY={v}", _chars(rng, _ALNUM, 24)),
        ("access_token={v}", _chars(rng, _B64URL, 48)),
        ("Authorization: Bearer {v}", _chars(rng, _B64URL, 40)),
        ('curl -H "Authorization: Bearer {v}" https://api.acme.io', _chars(rng, _ALNUM, 32)),
        ("authorization: Basic {v}", base64.b64encode(b"admin:pa55word").decode()),
        ("pass it as a bearer {v} header", _chars(rng, _ALNUM, 30)),
        ("DATABASE_URL=postgres://app:{v}@db.internal:5432/prod", _chars(rng, _ALNUM, 16)),
        ("redis://default:{v}@cache.example.com:6379/0", _chars(rng, _ALNUM, 20)),
        ('aws_secret_access_key = {v}', _chars(rng, _ALNUM + "/+", 40)),
        ('"SecretAccessKey": "{v}"', _chars(rng, _ALNUM + "/+", 40)),
        ("AWS_SECRET_ACCESS_KEY={v}", _chars(rng, _ALNUM + "/+", 40)),
        ("private_key: {v}", _chars(rng, _ALNUM, 44)),
        ("auth_token={v}", _chars(rng, string.hexdigits.lower()[:16], 32)),
        ("the wifi passphrase = {v}", "blue-otter-42"),
        ("pwd={v}", "letmein123"),
    ]  # fmt: skip
    return [Example(t.format(v=v), "secret", v) for t, v in whole + valued]


def pii_examples() -> list[Example]:
    """Every example, generated the same way on every run."""
    rng = random.Random(20240315)
    return [
        *_emails(rng), *_phones(rng), *_cards(rng), *_ssns(rng), *_ibans(rng), *_ips(rng),
        *_secrets(rng), *_spaced_ssns(),
    ]  # fmt: skip


# --- benign ------------------------------------------------------------------------------


def _ean13(rng: random.Random) -> str:
    body = "".join(rng.choice(string.digits) for _ in range(12))
    check = (10 - sum(int(d) * (3 if i % 2 else 1) for i, d in enumerate(body)) % 10) % 10
    return body + str(check)


def _isbn13(rng: random.Random) -> str:
    body = "978" + "".join(rng.choice(string.digits) for _ in range(9))
    check = (10 - sum(int(d) * (3 if i % 2 else 1) for i, d in enumerate(body)) % 10) % 10
    digits = body + str(check)
    return f"{digits[:3]}-{digits[3]}-{digits[4:7]}-{digits[7:12]}-{digits[12]}"


def benign_sentences() -> list[str]:
    """Sentences with many numbers, none of them PII, generated the same way on every run."""
    rng = random.Random(7)

    def n(lo: int, hi: int) -> int:
        return rng.randint(lo, hi)

    def day() -> str:
        return f"2024-{n(1, 12):02d}-{n(1, 28):02d}"

    makers = [
        lambda: f"Order #A-{n(100000, 999999)} shipped on {day()} and should arrive in {n(2, 9)} days.",
        lambda: f"We upgraded from v{n(1, 4)}.{n(0, 20)}.{n(0, 9)} to v{n(5, 9)}.{n(0, 20)}.0 last night.",
        lambda: f"Python {n(3, 3)}.{n(8, 13)}.{n(0, 12)} and Node {n(16, 22)}.{n(0, 12)}.{n(0, 9)} are installed.",
        lambda: f"Release {n(1, 3)}.{n(0, 9)}.{n(0, 9)}-rc.{n(1, 5)} fixes {n(3, 40)} bugs.",
        lambda: f"The meeting moved to {n(1, 28)}/{n(1, 12):02d}/2024 at {n(8, 18)}:{n(0, 59):02d}.",
        lambda: f"Invoice INV-2024-{n(1, 999999):06d} totals ${n(1, 9)},{n(100, 999)}.{n(10, 99)} including tax.",
        lambda: f"The price dropped from €{n(50, 99)}.{n(10, 99)} to €{n(20, 49)}.{n(10, 99)} ({n(10, 45)}% off).",
        lambda: f"Request id {uuid.UUID(int=rng.getrandbits(128), version=4)} timed out after {n(5, 60)}s.",
        lambda: f"ISBN {_isbn13(rng)} is the second edition, {n(200, 900)} pages.",
        lambda: f"UPS tracking 1Z{_chars(rng, string.ascii_uppercase + string.digits, 16)} shows it left Memphis.",
        lambda: f"FedEx tracking {n(1000, 9999)} {n(1000, 9999)} {n(1000, 9999)} was delivered at {n(8, 17)}:{n(0, 59):02d}.",
        lambda: f"USPS tracking {n(9400, 9499)} {n(1000, 9999)} {n(1000, 9999)} {n(1000, 9999)} {n(1000, 9999)} {n(10, 99)} is in transit.",
        lambda: f"Revenue grew {n(1, 30)}.{n(0, 9)}% year over year to ${n(1, 999)}.{n(0, 9)}M.",
        lambda: f"The office is at {n(30, 50)}.{n(1000, 9999)}, -{n(70, 125)}.{n(1000, 9999)}.",
        lambda: f"Cherry-pick commit {_chars(rng, '0123456789abcdef', 40)} onto the release branch.",
        lambda: f"Fixed in {_chars(rng, '0123456789abcdef', 7)} and {_chars(rng, '0123456789abcdef', 7)}.",
        lambda: f"The dev server listens on localhost:{n(3000, 9999)} and the db on port {n(5000, 6000)}.",
        lambda: f"Screen resolution {rng.choice(['1920x1080', '2560x1440', '3840x2160'])} at {n(60, 144)} Hz.",
        lambda: f"The table has {n(1, 9)},{n(100, 999)},{n(100, 999)} rows and {n(10, 90)} columns.",
        lambda: f"GET /api/v{n(1, 3)}/items returned HTTP {rng.choice([200, 201, 404, 500, 503])} in {n(10, 900)} ms.",
        lambda: f"Final score {n(80, 130)}-{n(80, 130)} after {n(1, 3)} overtimes.",
        lambda: f"Flight UA {n(100, 999)} departs from gate B{n(1, 40)}, seat {n(1, 40)}C.",
        lambda: f"Ship it to ZIP {n(10000, 99999)}, suite {n(100, 999)}.",
        lambda: f"The job started at unix time {n(1_600_000_000, 1_800_000_000)} and took {n(2, 90)} minutes.",
        lambda: f"Event timestamp {n(1_600_000_000_000, 1_800_000_000_000)} ms, sequence {n(1, 99999)}.",
        lambda: f"SKU-{n(10000, 99999)}-XL is back in stock ({n(1, 500)} units).",
        lambda: f"Use an aspect ratio of 16:9 and a scale of 1:{n(100, 50000)}.",
        lambda: f"Set max_tokens={n(100, 4000)} and temperature=0.{n(1, 9)} for this run.",
        lambda: f'usage: {{"prompt_tokens": {n(10, 5000)}, "completion_tokens": {n(10, 900)}, "total_tokens": {n(5000, 9000)}}}',
        lambda: f"The run took {n(0, 23):02d}:{n(0, 59):02d}:{n(0, 59):02d} wall clock on {n(2, 64)} cores.",
        lambda: f"See section {n(1, 9)}.{n(1, 9)}.{n(1, 9)} of RFC {n(1000, 9999)}.",
        lambda: f"Water boils at 100 °C and the sample froze at -{n(1, 40)}.{n(1, 9)} °C.",
        lambda: f"Dependency range ^{n(1, 5)}.{n(0, 9)}.0 resolved to {n(1, 5)}.{n(0, 9)}.{n(0, 20)}.",
        lambda: f"Ticket #{n(1000, 99999)} and PR #{n(100, 9999)} are linked.",
        lambda: f"The EAN-13 barcode reads {_ean13(rng)}.",
        lambda: f"Disk usage is {n(1, 99)}.{n(0, 9)} GB of {n(100, 999)} GB, {n(1, 9)}.{n(0, 9)} GHz CPU.",
        lambda: f"replicas: {n(1, 9)}\nmemory: {n(128, 4096)}Mi\ncpu: {n(100, 900)}m",
        lambda: f"Build {day().replace('-', '')}.{n(1, 9)} passed {n(100, 999)} of {n(1000, 1200)} tests.",
        lambda: f"Chapter {n(1, 30)}, verses {n(1, 20)}-{n(21, 40)}.",
        lambda: f"The recipe needs {n(1, 3)}/{n(2, 4)} cup sugar and {n(100, 500)} g flour at {n(160, 220)} °C.",
        lambda: f"Room {n(100, 999)}, floor {n(1, 30)}, badge {n(10000, 99999)}.",
        lambda: f"Population {n(1, 9)},{n(100, 999)},{n(100, 999)},{n(100, 999)} in {n(1990, 2024)}.",
        lambda: f"pi is about 3.{n(1000, 9999)} and e about 2.{n(7000, 7999)}.",
        lambda: f"Error 0x{_chars(rng, '0123456789ABCDEF', 8)} at offset {n(1000, 999999)}.",
        lambda: f"The batch ran from {day()}T{n(0, 23):02d}:{n(0, 59):02d}:{n(0, 59):02d}Z to {day()}.",
        lambda: f"Account balance: {n(100, 99999)}.{n(10, 99)} USD after {n(2, 40)} transactions.",
        lambda: f"Lat {n(-89, 89)}.{n(100000, 999999)}, lon {n(-179, 179)}.{n(100000, 999999)}, alt {n(0, 4000)} m.",
        lambda: f"Model gpt-4o-mini-2024-07-18 answered {n(1000, 9000)} requests at p95 {n(100, 900)} ms.",
        lambda: f"Split the {n(10, 99)} GB file into {n(2, 20)} parts of {n(100, 999)} MB.",
        lambda: f"Timeout is {n(1, 60)}s, retries {n(1, 5)}, backoff {n(1, 9)}.{n(0, 9)}x.",
        lambda: f"Join Zoom meeting ID {n(800, 899)} {n(1000, 9999)} {n(1000, 9999)} at {n(9, 16)}:00.",
        lambda: f"Windows build 10.0.{n(19000, 22999)}.{n(1000, 4999)} and Chrome {n(110, 130)}.0.{n(5000, 6999)}.{n(10, 199)}.",
        lambda: f"Log line: {day()} {n(0, 23):02d}:{n(0, 59):02d}:{n(0, 59):02d},{n(100, 999)} INFO worker-{n(1, 16)} started",
        lambda: f"+1 to that, and +{n(10, 500)} points for the demo.",
        lambda: f"Dial {n(100, 999)} then extension {n(1000, 9999)}; press 0 for the operator.",
        lambda: f"Serial 5CG{n(1000, 9999)}{_chars(rng, string.ascii_uppercase, 3)}, warranty until {day()}.",
        lambda: f"The lot number is {n(10**11, 10**12 - 1)} and the batch is {n(10**5, 10**6)}.",
        lambda: f"A4 is 210 x 297 mm; Letter is 8.5 x 11 in; {n(2, 40)} pages.",
        lambda: f"std::vector<int> v({n(1, 99)}); v[::{n(2, 5)}] is Python, not C++.",
        lambda: f"The key: use {n(2, 9)} spaces for indentation and wrap at {n(80, 120)} columns.",
    ]  # fmt: skip
    return [makers[i % len(makers)]() for i in range(260)] + _ssn_lookalikes()


def _ssn_lookalikes() -> list[str]:
    """Numbers in the 3-2-4 shape of an SSN with spaces but no cue near them, and SSN cues
    near phone numbers and other numbers (their own generator: the sentences above stay)."""
    rng = random.Random(1937)

    def n(lo: int, hi: int) -> int:
        return rng.randint(lo, hi)

    makers = [
        lambda: f"Bin {n(100, 899)} {n(10, 99)} {n(1000, 9999)} holds the spare fuses.",
        lambda: f"Part no. {n(100, 899)} {n(10, 99)} {n(1000, 9999)} fits the 2019 model.",
        lambda: f"The SSN column was dropped from the export schema last year; shelf {n(100, 899)} {n(10, 99)} {n(1000, 9999)} is free.",
        lambda: f"The SSN lookup took {n(100, 900)} ms over {n(10, 99)} calls on {n(2, 9)} cores.",
        lambda: f"Social security office hours are {n(8, 10)}:00 to {n(15, 17)}:00, room {n(100, 999)}.",
        lambda: f"SSN validation failed for {n(10, 99)} of {n(1000, 9999)} records in batch {n(100, 999)}.",
        lambda: f"SSN form v{n(1, 9)}.{n(0, 9)}, page {n(1, 20)} of {n(20, 40)}, revised {n(1990, 2024)}.",
        lambda: f"Lot numbers (not SSNs): {n(1000, 9999)} {n(100, 899)} {n(10, 99)} {n(1000, 9999)} {n(10, 99)}.",
    ]  # fmt: skip
    return [makers[i % len(makers)]() for i in range(24)]
