"""Schemathesis against the live server, from the server's own OpenAPI document: every
operation, coverage, fuzzing and stateful phases (following the document's links). No 5xx,
no undocumented status, no response outside its schema."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.harness import REPO, Mailsuite

ST = str(Path(sys.executable).parent / "st")
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance,response_headers_conformance")


def test_schemathesis_finds_no_server_error_and_no_schema_violation(
        start_mailsuite: Callable[..., Mailsuite], tmp_path: Path) -> None:
    server = start_mailsuite({"api": {"rate_limit": 0}})
    server.new_domain()
    host, port = server.http
    env = dict(os.environ, SCHEMATHESIS_HOOKS="tests.web.st_hooks", PYTHONPATH=str(REPO),
               MAILSUITE_ST_DB_URL=server.db_url)
    run = subprocess.run(
        [ST, "run", f"http://{host}:{port}/v1/openapi.json", "--checks", CHECKS,
         "--phases", "coverage,fuzzing,stateful", "--max-examples", "25", "--seed", "1",
         "--request-timeout", "20", "--no-color"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "Authentication failed" not in output, output
    assert "Stateful" in output and " passed" in output, output
    assert "Traceback" not in server.log()
