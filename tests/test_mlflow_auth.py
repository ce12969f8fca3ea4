"""tasks/mlflow_auth.py: MLflow's basic-auth check once per request, not once per call.

MLflow's real auth app (``mlflow.server.auth``, its SQLite user store in a temporary folder,
a real user with a real password hash) in a fresh process, with the ini naming
``tasks.mlflow_auth:authenticate_once`` as ``infra/mlflow-server.sh`` does. The app's own
``authenticate_request()`` is called three times inside one Flask request, as its
``before_request`` hook, its admin check and its validators do; the password hash checks
(``check_password_hash`` of the user store, counted by a wrapper that calls the real one)
are counted per request."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO

PROBE = r"""
import base64, json
import mlflow.server.auth as auth
from mlflow.server.auth import sqlalchemy_store
from flask import Flask
from werkzeug.datastructures import Authorization

auth.store.init_db(auth.auth_config.database_uri)
auth.store.create_user("alice", "alice-password-123")
checks = []
real = sqlalchemy_store.check_password_hash


def counting(pwhash, password):
    checks.append(1)
    return real(pwhash, password)


sqlalchemy_store.check_password_hash = counting
app = Flask("probe")
out = []
for user, password in (
    ("alice", "alice-password-123"),
    ("alice", "alice-password-123"),
    ("alice", "not-her-password"),
    ("nobody", "alice-password-123"),
):
    basic = base64.b64encode(f"{user}:{password}".encode()).decode()
    headers = {"Authorization": f"Basic {basic}"}
    with app.test_request_context("/api/2.0/mlflow/registered-models/get", headers=headers):
        before = len(checks)
        answers = [auth.authenticate_request() for _ in range(3)]
        out.append({
            "checks": len(checks) - before,
            "users": [a.username if isinstance(a, Authorization) else None for a in answers],
            "refused": [getattr(a, "status_code", None) == 401 for a in answers],
        })
print(json.dumps(out))
"""


def _probe(tmp_path, function: str) -> list[dict]:
    ini = tmp_path / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{tmp_path / 'basic_auth.db'}\n"
        f"admin_username = admin\nauthorization_function = {function}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_DISABLE_TELEMETRY="true")
    proc = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_password_checked_once_per_request_and_every_request(tmp_path):
    right, again, wrong, unknown = _probe(tmp_path, "tasks.mlflow_auth:authenticate_once")
    # one hash check for the three calls of a request, and the same user each time
    assert right == {"checks": 1, "users": ["alice"] * 3, "refused": [False] * 3}
    # nothing kept between requests: the next request with the same header checks again
    assert again == right
    # a refused password is checked (and refused) on every call, never kept
    assert wrong == {"checks": 3, "users": [None] * 3, "refused": [True] * 3}
    # an unknown user is refused without a hash to check
    assert unknown == {"checks": 0, "users": [None] * 3, "refused": [True] * 3}


def test_server_script_refuses_bad_auth_settings_before_creating_anything(tmp_path):
    """``infra/mlflow-server.sh`` with an unknown ``MLFLOW_AUTH_FUNCTION`` or
    ``MLFLOW_AUTH_DEFAULT_PERMISSION``: exit 2, one line naming the variable, and no data
    folder created."""
    for key, value in (
        ("MLFLOW_AUTH_FUNCTION", "bogus"),
        ("MLFLOW_AUTH_DEFAULT_PERMISSION", "OWNER"),
    ):
        data = tmp_path / key
        env = {
            **os.environ,
            "MLFLOW_AUTH": "basic",
            "MLFLOW_DATA_DIR": str(data),
            key: value,
        }
        r = subprocess.run(
            ["bash", str(REPO / "infra" / "mlflow-server.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 2, (key, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and f"{key}={value} unknown" in lines[0], r.stderr
        assert not data.exists()
