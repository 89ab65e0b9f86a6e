"""Rich outputs of warm Python (like a notebook kernel): the last expression, display() and
matplotlib figures come back as typed outputs, redacted and capped; what the worker sends is
checked as untrusted data. Run as root and as uid 65534.

pandas and matplotlib come from the test venv (`make venv` installs them): its site-packages is
bound read-only into the sandbox and put on the sandbox's PYTHONPATH. If the sandbox's python
cannot import them, the tests fail (never skip)."""

from __future__ import annotations

import base64
import io
import json
import secrets
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from cellblock.runtimes.outputs import OutputRedactor, parse_outputs
from conftest import IS_ROOT, SETPRIV

SITE = sysconfig.get_paths()["purelib"]
PNG = b"\x89PNG\r\n\x1a\n"

FORGED = textwrap.dedent("""\
    import base64, json, os, sys
    f = sys._getframe()
    while "ctl_out" not in f.f_locals:  # the worker loop: its result pipe
        f = f.f_back
    g = sys._getframe()
    while "req" not in g.f_locals:  # run_code: the request, with the call's id
        g = g.f_back
    bad = [
        "junk", {"data": 3},
        {"data": {"image/png": "!!not base64!!", "text/evil": "x",
                  "image/jpeg": base64.b64encode(b"GIF89a").decode(),
                  "application/json": "{not json", "text/plain": 7}},
        {"data": {"text/html": "<b>" + os.environ["TOKEN"] + "</b>"}},
    ]
    body = json.dumps({"exit_code": 0, "value": None, "error": None, "outputs": bad,
                       "call": g.f_locals["req"]["call"]}).encode()
    os.write(f.f_locals["ctl_out"], b"r" + len(body).to_bytes(4, "big") + body)
""")

#: (name, code, max_output), run in order in one stateful kernel.
CASES = [
    ("untouched", "import sys\nsorted(m for m in sys.modules if m.split('.')[0] in "
                  "('matplotlib', 'pandas', 'numpy', 'IPython'))", None),
    ("imports", "import pandas, matplotlib\nprint(pandas.__version__, matplotlib.__version__)",
     None),
    ("dataframe", "import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})", None),
    ("figure", "import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\n"
               "ax.plot([1, 2, 3], [1, 4, 9])\nx = 1", None),
    ("figures_closed", "len(plt.get_fignums())", None),
    ("home", "import os\n[p for p in ('~/.cache/matplotlib', '~/.config/matplotlib', "
             "'~/.matplotlib') if os.path.exists(os.path.expanduser(p))]", None),
    # Everything under the workspace after the plot (font and config caches included).
    ("workspace", "import os\nsorted(os.path.relpath(os.path.join(d, n), '/workspace') "
                  "for d, ds, fs in os.walk('/workspace') for n in ds + fs)", None),
    ("display", "class J:\n    def _repr_json_(self): return {'x': [1, 2]}\n"
                "display('first', {'k': 1})\ndisplay(J())\n'last'", None),
    ("broken_html", "class B:\n    def _repr_html_(self): raise RuntimeError('boom')\n"
                    "    def __repr__(self): return 'B-repr'\nB()", None),
    ("secret", "import os\ntok = os.environ['TOKEN']\n"
               "class S:\n    def _repr_json_(self): return {'k': tok}\n"
               "display(S())\npd.DataFrame({'k': [tok]})", None),
    ("hostile", "class H:\n    def __repr__(self): return 'x' * 100_000_000\n"
                "    def _repr_html_(self): return '<b>' * 40_000_000\nH()", 65536),
    ("hostile_unicode", "class U:\n    def __repr__(self): return '\\u20ac' * 50_000_000\nU()",
     None),
    ("after_hostile", "21 * 2", None),
    ("forged", FORGED, None),
    ("after_forged", "'still serving'", None),
]

#: Runs the cases in one session (as the calling user) and prints the results as JSON.
SCRIPT = textwrap.dedent("""\
    import base64, json, sys
    import cellblock.sandbox
    from cellblock.session import Sandbox

    site, secret, cases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    # The venv's packages, read-only, for the sandbox's python (a test fixture, not a policy).
    prefixes = cellblock.sandbox.runtime_prefixes
    cellblock.sandbox.runtime_prefixes = lambda: [*prefixes(), site]

    def dump(r):
        return {
            "value": r.value, "error": r.error, "exit_code": r.exit_code,
            "outputs_error": r.outputs_error, "stderr": r.stderr[-2000:],
            "redactions": r.redactions,
            "outputs": [{"truncated": o.truncated, "data": {
                m: v if isinstance(v, str) else {"bytes": base64.b64encode(v).decode()}
                for m, v in o.data.items()}} for o in r.outputs],
        }

    out = {}
    with Sandbox(env={"PYTHONPATH": site}, secrets={"TOKEN": secret}, memory="2g",
                 timeout=120) as sb:
        for name, code, cap in cases:
            out[name] = dump(sb.run_python(code, stateful=True, max_output=cap))
        out["stateless"] = dump(sb.run_python({n: c for n, c, _ in cases}["dataframe"]))
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def secret_value() -> str:
    # '&' and '<' are escaped by pandas' HTML: the escaped form must be redacted too.
    return "tok&<en-" + secrets.token_hex(8)


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    """The venv's packages where a bind can show them: the sandbox has a /tmp of its own, so
    a checkout under /tmp gets a hard-linked copy (same filesystem, no data copied) outside."""
    if not Path(SITE).resolve().is_relative_to("/tmp"):
        yield SITE
        return
    copy = Path(tempfile.mkdtemp(prefix="cellblock-rich-", dir="/var/tmp"))
    try:
        copy.chmod(0o755)
        subprocess.run(["cp", "-al", f"{SITE}/.", str(copy)], check=True)
        yield str(copy)
    finally:
        shutil.rmtree(copy)


@pytest.fixture(scope="module", params=["self", "nobody"],
                ids=["root" if IS_ROOT else "user", "nobody"])
def results(request: pytest.FixtureRequest, secret_value: str, site: str) -> dict[str, Any]:
    """Every case's result, run once per caller identity."""
    if request.param == "self":
        argv = [sys.executable, "-c", SCRIPT, site, secret_value, json.dumps(CASES)]
        env = None
    else:
        nobody_dir: Path = request.getfixturevalue("nobody_dir")
        argv = [*SETPRIV, "env", "-i", "PATH=/usr/bin:/bin", f"PYTHONPATH={nobody_dir}",
                "/usr/bin/python3", "-c", SCRIPT, site, secret_value, json.dumps(CASES)]
        env = {"PATH": "/usr/bin:/bin"}
    res = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd="/", env=env,
                         check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    out: dict[str, Any] = json.loads(res.stdout)
    imports = out["imports"]
    assert imports["exit_code"] == 0, (
        "the sandbox's python cannot import pandas and matplotlib from the test venv "
        f"({site}; `make venv` installs them): {imports['stderr']}"
    )
    return out


def forms(result: dict[str, Any]) -> list[list[str]]:
    return [sorted(o["data"]) for o in result["outputs"]]


def test_dataframe_gives_html_and_plain(results: dict[str, Any]) -> None:
    for name in ("dataframe", "stateless"):
        r = results[name]
        assert r["error"] is None and r["outputs_error"] is None, r
        assert forms(r) == [["text/html", "text/plain"]]
        data = r["outputs"][0]["data"]
        assert "<table" in data["text/html"] and "<td>x</td>" in data["text/html"]
        assert data["text/plain"] == r["value"] and "a  b" in data["text/plain"]


def test_figure_gives_a_png_and_is_closed(results: dict[str, Any]) -> None:
    r = results["figure"]
    assert r["error"] is None and r["value"] is None, r
    assert forms(r) == [["image/png", "text/plain"]]
    png = base64.b64decode(r["outputs"][0]["data"]["image/png"]["bytes"])
    assert png.startswith(PNG)
    image = Image.open(io.BytesIO(png))
    image.load()
    assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
    assert r["outputs"][0]["data"]["text/plain"].startswith("<Figure size")
    # Shown once: the figure was closed after the call, as Jupyter's inline backend does.
    assert results["figures_closed"]["value"] == "0"
    assert results["figures_closed"]["outputs"][0]["data"] == {"text/plain": "0"}
    # matplotlib's font cache and config stay out of the workspace (HOME), and so does
    # fontconfig's cache (matplotlib runs fc-list): the workspace the agent reads is as it was.
    assert results["home"]["value"] == "[]"
    assert results["workspace"]["value"] == "[]", results["workspace"]


def test_display_keeps_order_then_the_last_expression(results: dict[str, Any]) -> None:
    r = results["display"]
    assert r["error"] is None and r["outputs_error"] is None, r
    data = [o["data"] for o in r["outputs"]]
    assert [d["text/plain"] for d in data[:2]] == ["'first'", "{'k': 1}"]
    assert json.loads(data[2]["application/json"]) == {"x": [1, 2]}
    assert data[2]["text/plain"].startswith("<__main__.J object")
    assert data[3] == {"text/plain": "'last'"} and r["value"] == "'last'"
    assert len(data) == 4


def test_a_raising_repr_method_falls_back_to_repr(results: dict[str, Any]) -> None:
    r = results["broken_html"]
    assert r["error"] is None and r["exit_code"] == 0, r
    assert [o["data"] for o in r["outputs"]] == [{"text/plain": "B-repr"}]


def test_secret_is_redacted_in_html_plain_and_json(
    results: dict[str, Any], secret_value: str
) -> None:
    r = results["secret"]
    assert r["error"] is None, r
    whole = json.dumps(r)
    escaped = secret_value.replace("&", "&amp;").replace("<", "&lt;")
    for form in (secret_value, escaped, json.dumps(secret_value)[1:-1], "tok&amp;"):
        assert form not in whole and form not in json.loads(whole).__repr__()
    assert forms(r) == [["application/json", "text/plain"], ["text/html", "text/plain"]]
    assert json.loads(r["outputs"][0]["data"]["application/json"]) == {"k": "[REDACTED:TOKEN]"}
    assert "[REDACTED:TOKEN]" in r["outputs"][1]["data"]["text/html"]
    assert "[REDACTED:TOKEN]" in r["outputs"][1]["data"]["text/plain"]
    # value, JSON, HTML (escaped form) and plain: each redaction is counted in the report.
    assert r["redactions"].get("TOKEN", 0) >= 4, r["redactions"]


def test_a_100_mb_repr_is_capped(results: dict[str, Any]) -> None:
    r = results["hostile"]
    assert r["error"] is None and r["exit_code"] == 0, r
    assert r["value"] == "x" * 65536
    (out,) = r["outputs"]
    assert out["truncated"] is True
    assert out["data"]["text/plain"] == "x" * 65536
    assert out["data"]["text/html"] == ("<b>" * 40_000)[:65536]
    # A repr that grows six-fold as it travels (JSON-escaped) is cut to fit, not lost.
    u = results["hostile_unicode"]
    assert u["error"] is None and u["exit_code"] == 0, u
    assert u["value"] and set(u["value"]) == {"\u20ac"} and len(u["value"]) <= 1 << 20
    assert u["outputs"][0]["truncated"] and set(u["outputs"][0]["data"]["text/plain"]) == {"\u20ac"}
    assert results["after_hostile"]["value"] == "42"


def test_matplotlib_and_pandas_are_not_imported_for_the_code(results: dict[str, Any]) -> None:
    assert results["untouched"]["value"] == "[]"


def test_forged_outputs_are_checked_and_the_kernel_serves_on(results: dict[str, Any]) -> None:
    r = results["forged"]
    err = r["outputs_error"]
    assert err is not None, r
    for why in ("output 0: not an object", "output 1: not an object",
                "image/png is not base64", "unknown MIME type 'text/evil'",
                "image/jpeg does not start with its signature",
                "application/json is not JSON", "form 'text/plain' is not text"):
        assert why in err, err
    assert r["outputs"] == [
        {"truncated": False, "data": {"text/html": "<b>[REDACTED:TOKEN]</b>"}}
    ]
    assert results["after_forged"]["value"] == "'still serving'"


def test_parse_outputs_never_raises_on_garbage() -> None:
    red = OutputRedactor({})
    for raw in (None, 3, "x", {}, [None], [[]], [{"data": None}], [{"data": {1: 2}}],
                [{"data": {"image/png": ""}}], [{"data": {"image/png": "=" * 9}}],
                [{"data": {"text/plain": "a"}, "truncated": "yes"}], [{}] * 500):
        outputs, error = parse_outputs(raw, red, 10)
        assert raw is None or raw == [{"data": {"text/plain": "a"}, "truncated": "yes"}] or error
        assert all(o.data for o in outputs)
    outputs, error = parse_outputs([{"data": {"text/plain": "a" * 50,
                                              "application/json": json.dumps("b" * 50)}}],
                                   red, 10)
    assert error is None
    assert outputs[0].data == {"text/plain": "a" * 10} and outputs[0].truncated


def test_outputs_cross_the_http_api_exactly() -> None:
    from cellblock.runtimes.outputs import Output
    from cellblock.runtimes.warm import CodeResult
    from cellblock.service.models import RunReport

    png = PNG + bytes(range(256))
    result = CodeResult(
        exit_code=0, signal=None, reason="exited", stdout_bytes=b"", stderr_bytes=b"",
        stdout_truncated=False, stderr_truncated=False, wall_time_s=0.1, cpu_time_s=0.0,
        peak_memory_bytes=0, violations=[], enforcement={}, value="1",
        outputs=[Output(data={"image/png": png, "text/plain": "<Figure>"}),
                 Output(data={"text/html": "<b>é</b>"}, truncated=True)],
        outputs_error="output 2: unknown MIME type 'x/y'",
    )
    wire = json.loads(RunReport.of(result).model_dump_json())
    assert wire["outputs"][0]["data"]["image/png"] == base64.b64encode(png).decode()
    back = RunReport.model_validate(wire).to_result()
    assert back.outputs == result.outputs and back.outputs_error == result.outputs_error
