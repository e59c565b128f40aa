"""The served OpenAPI document tells the truth: schemathesis (every check) against the live app.

A real service (uvicorn, ONNX Runtime) on a private redis-server with the tiny MVKE model
published and its users loaded, API keys on (so 401s and the security schemes are
exercised too). schemathesis' CLI runs its examples, coverage and fuzzing phases with all
checks (server errors, status codes, content types, headers, response schemas, valid data
accepted, invalid data rejected, auth honoured, unsupported methods, ...) and any finding
fails the test. A fixed seed and a small example budget keep it to seconds.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service.test_service import LiveService, make_settings, published, svc_r, svc_redis, user_ids  # noqa: F401

API_KEY = "contract-test-key"


def schemathesis_cli() -> list[str]:
    exe = Path(sys.executable).with_name("schemathesis")
    if not exe.exists():
        exe = shutil.which("schemathesis")
    if exe is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    return [str(exe)]


def test_schemathesis_finds_nothing(svc_redis, published, dataset_dir, tmp_path):
    cli = schemathesis_cli()
    prefix = published("mvke-mt", "synthetic")
    settings = make_settings(svc_redis.url, prefix, api_keys=API_KEY, max_batch_users=8,
                             max_candidate_tags=50, max_body_bytes=64 * 1024)
    user = user_ids(dataset_dir("synthetic"), 1, seed=7)[0]
    _publish_audiences(svc_redis, prefix, tmp_path)
    with LiveService(settings) as s:
        spec = s.client.get("/openapi.json").json()
        assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
        for code in ("400", "401", "404", "409", "413", "414", "415", "422", "503"):
            assert code in spec["paths"]["/users/{user_id}/tags"]["post"]["responses"], code
        # the documented examples are answered with 200 by the served model
        for example in spec["components"]["schemas"]["TagRequest"]["examples"]:
            resp = s.tag(user, example, headers={"authorization": f"Bearer {API_KEY}"})
            assert resp.status_code == 200, (example, resp.text)
        (tmp_path / "schemathesis.toml").write_text("")   # no config file of the user's is picked up
        base = [*cli, "run", f"{s.url}/openapi.json", "--checks", "all", "--phases", "examples,coverage,fuzzing",
                "--max-examples", "40", "--seed", "1", "--workers", "1", "--request-timeout", "10",
                "-H", f"Authorization: Bearer {API_KEY}", "--no-color", "--suppress-health-check", "all",
                "--warnings", "off"]
        env = {**os.environ, "SCHEMATHESIS_HOOKS": ""}
        # the tag, model and info routes exactly as before the audience routes existed (same operations, same
        # generated cases), then the audience routes on their own with one override: a grammar-typed string
        # (an expression, a tag or task of the index's catalogue) that the schema cannot enumerate may be a
        # valid string and still a 422 naming the bad token (the tag routes' enums come from the model)
        runs = [subprocess.run([*base, "--exclude-path-regex", "audience"], cwd=tmp_path, capture_output=True,
                               text=True, timeout=240, env=env)]
        aud_dir = tmp_path / "audience-run"
        aud_dir.mkdir()
        (aud_dir / "schemathesis.toml").write_text(
            '[[operations]]\ninclude-path-regex = "audience"\n'
            'checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "404", "422"]\n')
        runs.append(subprocess.run([*base, "--include-path-regex", "audience"], cwd=aud_dir, capture_output=True,
                                   text=True, timeout=240, env=env))
    for run in runs:
        out = run.stdout + run.stderr
        summary = out[out.rfind("SUMMARY"):] if "SUMMARY" in out else out[-3000:]
        print(summary)
        assert run.returncode == 0, out[-12000:]
        assert "No issues found" in summary and not re.search(r"\d+ failures?\b", summary), summary


def _publish_audiences(server, prefix: str, tmp_path: Path) -> None:
    """An audience index under the test's prefix, so the audience routes answer (not 503: no index)."""
    from batch.audience_synth import synth_parts
    from batch.audiences import build_index, publish
    from mvke.runtime.audience import AudienceRule
    from mvke.runtime.keys import Keys
    files, tags = synth_parts(tmp_path / "audience-rows", 300, n_tags=30, k=5, seed=2)
    r = server.client()
    try:
        publish(build_index(files, ["interest", "intention"], tags, AudienceRule(5), "contract", {}), r, Keys(prefix))
    finally:
        r.close()
