"""Secret redaction through `cellblock.Redactor`.

Every form a program prints a secret in (raw, hex, base64 and base32 at each alignment,
percent- and JSON-escaped, UTF-16 and UTF-32 in both byte orders) is computed here by an
independent Python reference, planted in arbitrary text, fed in arbitrary chunks, and must never
come out; text without secrets must come out unchanged.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import threading
import urllib.parse

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cellblock import Redactor
from cellblock.errors import SecretError

B64_STD = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
B64_URL = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def b64_fragment(value: bytes, offset: int, alphabet: bytes) -> bytes:
    """Base64 characters fully determined by `value` placed at byte `offset` (mod 3)."""
    bits = "0" * (8 * offset) + "".join(f"{b:08b}" for b in value)
    first = -(-8 * offset // 6)
    return bytes(alphabet[int(bits[6 * i : 6 * i + 6], 2)] for i in range(first, len(bits) // 6))


def b32_fragment(value: bytes, offset: int, lower: bool) -> bytes:
    """Base32 characters fully determined by `value` placed at byte `offset` (mod 5)."""
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    bits = "0" * (8 * offset) + "".join(f"{b:08b}" for b in value)
    first = -(-8 * offset // 5)
    chars = bytes(alphabet[int(bits[5 * i : 5 * i + 5], 2)] for i in range(first, len(bits) // 5))
    return chars.lower() if lower else chars


def wide_forms(text: str) -> set[bytes]:
    """The secret as a program writing UTF-16 or UTF-32 (either byte order) prints it."""
    return {text.encode(c) for c in ("utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be")}


def json_forms(text: str) -> set[str]:
    """String bodies as json.dumps, serde_json, JSON.stringify, Go, PHP and Java print them."""
    bodies = {json.dumps(text, ensure_ascii=a)[1:-1] for a in (True, False)}
    html = {
        "<": "\\u003c",
        ">": "\\u003e",
        "&": "\\u0026",
        "\u2028": "\\u2028",
        "\u2029": "\\u2029",
    }
    # A \u escape is one preceded by an even number of backslashes.
    escape = re.compile(r"(?<!\\)((?:\\\\)*)\\u([0-9a-f]{4})")
    forms = set()
    for body in bodies:
        for slash in (body, body.replace("/", "\\/")):
            for go in (slash, "".join(html.get(c, c) for c in slash)):
                forms.add(go)
                forms.add(escape.sub(lambda m: m.group(1) + "\\u" + m.group(2).upper(), go))
    return forms


def percent_forms(text: str) -> set[str]:
    quoted = {
        urllib.parse.quote(text),
        urllib.parse.quote(text, safe=""),
        urllib.parse.quote_plus(text),
        urllib.parse.quote(text, safe="!*'()"),  # JavaScript's encodeURIComponent
    }
    return quoted | {re.sub("%[0-9A-F]{2}", lambda m: m.group(0).lower(), q) for q in quoted}


def standalone_forms(secret: str) -> set[bytes]:
    """Every form that prints the secret alone (not embedded in a longer encoding)."""
    raw = secret.encode()
    forms = {raw, raw.hex().encode(), raw.hex().upper().encode()}
    for encoded in (base64.b64encode(raw), base64.urlsafe_b64encode(raw)):
        forms |= {encoded, encoded.rstrip(b"=")}
    for encoded in (base64.b32encode(raw), base64.b32encode(raw).lower()):
        forms |= {encoded, encoded.rstrip(b"=")}
    forms |= {f.encode() for f in percent_forms(secret) | json_forms(secret)}
    return forms | wide_forms(secret)


def all_forms(secret: str) -> set[bytes]:
    """Standalone forms plus the base64 characters the secret determines at each alignment."""
    raw = secret.encode()
    fragments = {b64_fragment(raw, k, a) for k in range(3) for a in (B64_STD, B64_URL)}
    fragments |= {b32_fragment(raw, k, lower) for k in range(5) for lower in (False, True)}
    return standalone_forms(secret) | fragments


def feed_chunks(redactor: Redactor, data: bytes, cuts: list[int]) -> bytes:
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    out = b"".join(redactor.feed(data[a:b]) for a, b in itertools.pairwise(bounds))
    return out + redactor.finish()


# The replacement "[REDACTED:NAME]" is plain text: a secret starting with "]" or ending with
# "[" could be re-formed from it and its neighbours (documented limit of the redactor).
SECRET_CHARS = st.characters(exclude_characters="[]", codec="utf-8")
secrets_text = st.one_of(
    st.text(alphabet=SECRET_CHARS, min_size=8, max_size=40),
    st.text(alphabet="ab/+=?&", min_size=8, max_size=16),  # overlaps, escapes, self-similarity
)
secret_lists = st.lists(secrets_text, min_size=1, max_size=3)
cut_lists = st.lists(st.integers(min_value=0, max_value=10_000), max_size=8)
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_redactor(values: list[str]) -> Redactor:
    names = [f"S{i}" for i in range(len(values))]
    for value in values:
        assume(not any(value in f"[REDACTED:{n}]" for n in names))
    try:
        return Redactor(list(zip(names, values, strict=False)))
    except SecretError as e:
        # An encoded form inside a replacement (refused by design): not a case to test here.
        assume("replacement" not in str(e))
        raise


#: Longer encoded streams a secret can be embedded in at any byte offset.
EMBEDDINGS = [
    base64.b64encode,
    base64.urlsafe_b64encode,
    base64.b32encode,
    lambda data: base64.b32encode(data).lower(),
    lambda data: data.decode("latin-1").encode("utf-16-le"),
    lambda data: data.decode("latin-1").encode("utf-32-be"),
]


@st.composite
def planted(draw: st.DrawFn, values: list[str]) -> bytes:
    """Arbitrary text with forms of the secrets planted in it, some inside base64 streams."""
    parts: list[bytes] = []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["text", "form", "embedded"]))
        if kind == "text":
            parts.append(draw(st.text(max_size=30)).encode())
        elif kind == "form":
            secret = draw(st.sampled_from(values))
            parts.append(draw(st.sampled_from(sorted(standalone_forms(secret)))))
        else:
            raw = draw(st.sampled_from(values)).encode()
            before = draw(st.binary(max_size=7))
            after = draw(st.binary(max_size=5))
            encode = draw(st.sampled_from(EMBEDDINGS))
            parts.append(encode(before + raw + after))
    return b"".join(parts)


@PROPERTY
@given(data=st.data(), values=secret_lists, cuts=cut_lists)
def test_no_form_of_a_secret_survives_any_chunking(
    data: st.DataObject, values: list[str], cuts: list[int]
) -> None:
    redactor = make_redactor(values)
    text = data.draw(planted(values))
    out = feed_chunks(redactor, text, cuts)
    for value in values:
        for form in all_forms(value):
            assert form not in out, (value, form)
    assert out == redactor.redact_bytes(text)


@PROPERTY
@given(values=secret_lists, offset=st.integers(0, 2), before=st.binary(max_size=9))
def test_base64_fragment_reference_is_where_the_secret_lands(
    values: list[str], offset: int, before: bytes
) -> None:
    raw = values[0].encode()
    prefix = before + b"\0" * ((offset - len(before)) % 3)
    for encode, alphabet in ((base64.b64encode, B64_STD), (base64.urlsafe_b64encode, B64_URL)):
        assert b64_fragment(raw, len(prefix) % 3, alphabet) in encode(prefix + raw + b"xy")


@PROPERTY
@given(values=secret_lists, offset=st.integers(0, 4), before=st.binary(max_size=9))
def test_base32_fragment_reference_is_where_the_secret_lands(
    values: list[str], offset: int, before: bytes
) -> None:
    raw = values[0].encode()
    prefix = before + b"\0" * ((offset - len(before)) % 5)
    encoded = base64.b32encode(prefix + raw + b"xyz")
    assert b32_fragment(raw, len(prefix) % 5, False) in encoded
    assert b32_fragment(raw, len(prefix) % 5, True) in encoded.lower()


@PROPERTY
@given(
    values=secret_lists,
    codec=st.sampled_from(["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be", "utf-16"]),
    before=st.text(max_size=20),
    after=st.text(max_size=20),
    cuts=cut_lists,
)
def test_wide_text_never_shows_a_secret(
    values: list[str], codec: str, before: str, after: str, cuts: list[int]
) -> None:
    # A whole program output in UTF-16/32 (with a BOM for "utf-16"), cut anywhere.
    redactor = make_redactor(values)
    text = (before + "".join(f" {v} " for v in values) + after).encode(codec)
    out = feed_chunks(redactor, text, cuts)
    for value in values:
        for form in wide_forms(value):
            assert form not in out, (value, codec)
    assert redactor.counts


@PROPERTY
@given(text=st.text(), values=secret_lists, cuts=cut_lists)
def test_text_without_secrets_passes_unchanged(
    text: str, values: list[str], cuts: list[int]
) -> None:
    redactor = make_redactor(values)
    data = text.encode()
    assume(not any(f in data for v in values for f in all_forms(v)))
    assert feed_chunks(redactor, data, cuts) == data
    assert redactor.redact(text) == text
    assert redactor.counts == {}


@PROPERTY
@given(data=st.binary(), cuts=cut_lists)
def test_no_secrets_is_passthrough(data: bytes, cuts: list[int]) -> None:
    redactor = Redactor({})
    assert feed_chunks(redactor, data, cuts) == data


@PROPERTY
@given(
    data=st.data(),
    value=st.text(
        alphabet=st.characters(exclude_characters="[]\n", codec="utf-8"),
        min_size=8,
        max_size=30,
    ),
    cuts=cut_lists,
)
def test_counts_one_per_planted_form(data: st.DataObject, value: str, cuts: list[int]) -> None:
    redactor = make_redactor([value])
    forms = data.draw(st.lists(st.sampled_from(sorted(standalone_forms(value))), max_size=6))
    text = b"\n".join([b"start", *forms, b"end"])
    out = feed_chunks(redactor, text, cuts)
    assert redactor.counts == ({"S0": len(forms)} if forms else {})
    assert out == b"\n".join([b"start", *[b"[REDACTED:S0]"] * len(forms), b"end"])


TOKEN = "ghp_S3cr3t/Tok+en=42"


def test_every_standalone_form_is_replaced() -> None:
    redactor = Redactor({"GH": TOKEN})
    for form in sorted(standalone_forms(TOKEN)):
        assert redactor.redact_bytes(b"<" + form + b">") == b"<[REDACTED:GH]>", form


def test_dict_list_and_bytes_inputs() -> None:
    by_dict = Redactor({"A": "aaaa-1111", "B": b"bbbb-2222"})
    by_list = Redactor([("A", "aaaa-1111"), ("B", b"bbbb-2222")])
    for redactor in (by_dict, by_list):
        assert redactor.names == ["A", "B"]
        assert redactor.redact("aaaa-1111 bbbb-2222") == "[REDACTED:A] [REDACTED:B]"
        assert redactor.counts == {"A": 1, "B": 1}


def test_output_is_emitted_at_once_unless_it_may_start_a_secret() -> None:
    redactor = Redactor({"GH": TOKEN})
    assert redactor.feed(b'print("hello")\n') == b'print("hello")\n'
    assert redactor.feed(b"token ghp_S3") == b"token "
    assert redactor.feed(b"cr3t/Tok+en=42") == b"[REDACTED:GH]"
    assert redactor.feed(b" ghp_") == b" "
    assert redactor.finish() == b"ghp_"
    assert redactor.counts == {"GH": 1}


def test_short_secret_refused_without_showing_it() -> None:
    with pytest.raises(SecretError) as info:
        Redactor({"PIN": "1234567"})
    assert "PIN" in str(info.value)
    assert "1234567" not in str(info.value)


def test_bad_inputs_never_show_values() -> None:
    with pytest.raises(TypeError) as info:
        Redactor({"A": 123456789})
    assert "123456789" not in str(info.value)
    with pytest.raises(TypeError):
        Redactor("not-a-mapping")
    with pytest.raises(SecretError):
        Redactor({"bad name": "long-enough-value"})
    with pytest.raises(SecretError, match="replacement"):
        Redactor({"A": "REDACTED"})  # every replacement would print it


@pytest.mark.parametrize(("secrets", "named"), [
    ({"H4141414141414141": "AAAAAAAA"}, "H4141414141414141"),  # the name spells its hex
    ({"QUFBQUFBQUFBQUFB": "AAAAAAAAAAAA"}, "QUFBQUFBQUFBQUFB"),  # ... its base64
    ({"A": "AAAAAAAA", "B_4141414141414141": "unrelated-value"}, "A"),  # another's name
])
def test_a_secret_whose_encoding_a_replacement_spells_is_refused(
    secrets: dict[str, str], named: str
) -> None:
    # Accepted, "[REDACTED:H4141414141414141]" would print the secret as hex in its place.
    with pytest.raises(SecretError, match="replacement") as info:
        Redactor(secrets)
    assert f"secret {named} " in str(info.value)
    assert not any(v in str(info.value) for v in secrets.values())


def test_redacted_text_redacts_to_itself() -> None:
    # No replacement holds a form of any secret: a second pass (e.g. a log of a redacted
    # run) changes nothing and counts nothing.
    redactor = Redactor({"REDACTED_TOKEN": "s3cr3t-v4lue", "B": "bbbbbbbb-1"})
    once = redactor.redact("x s3cr3t-v4lue bbbbbbbb-1 y")
    assert once == "x [REDACTED:REDACTED_TOKEN] [REDACTED:B] y"
    again = Redactor({"REDACTED_TOKEN": "s3cr3t-v4lue", "B": "bbbbbbbb-1"})
    assert again.redact(once) == once and not any(again.counts.values())


def test_repr_shows_names_only() -> None:
    redactor = Redactor({"GH": TOKEN, "DB": "postgres://u:pw@db"})
    assert repr(redactor) == "Redactor(names=['GH', 'DB'])"
    assert TOKEN not in repr(redactor)


def test_large_buffers_match_small_ones() -> None:
    # Above 64 KiB the GIL is released; the result must not depend on that path.
    redactor = Redactor({"GH": TOKEN})
    line = f"log line {TOKEN} and {base64.b64encode(TOKEN.encode()).decode()}\n"
    text = line * 5000
    assert len(text) > 64 * 1024
    assert redactor.redact(text) == "log line [REDACTED:GH] and [REDACTED:GH]\n" * 5000
    out = feed_chunks(redactor, text.encode(), [70_000, 140_001])
    assert (
        out
        == text.replace(TOKEN, "[REDACTED:GH]")
        .replace(base64.b64encode(TOKEN.encode()).decode(), "[REDACTED:GH]")
        .encode()
    )


def test_one_redactor_shared_by_threads() -> None:
    # Large one-shot calls release the GIL: threads sharing a redactor must not collide.
    redactor = Redactor({"GH": TOKEN})
    text = f"x {TOKEN} " * 20_000
    results: list[str] = []

    def work() -> None:
        for _ in range(5):
            results.append(redactor.redact(text))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["x [REDACTED:GH] " * 20_000] * 20
    assert redactor.counts == {"GH": 20 * 20_000}


def test_separate_streams_in_threads() -> None:
    # Each thread has its own Redactor; big feeds release the GIL, so they run together.
    text = (f"x {TOKEN} " * 20_000).encode()
    results: list[bytes] = []

    def work() -> None:
        redactor = Redactor({"GH": TOKEN})
        results.append(redactor.feed(text) + redactor.finish())

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [b"x [REDACTED:GH] " * 20_000] * 4
