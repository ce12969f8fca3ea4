"""MLflow's basic-auth check, once per HTTP request.

``infra/mlflow-server.sh`` (``MLFLOW_AUTH=basic``) names :func:`authenticate_once` as the
``authorization_function`` of MLflow's basic-auth app (its ini file; the documented hook for
a custom authentication function). The app calls its authorization function several times
while it serves one request: in its ``before_request`` hook, again to ask whether the
caller is an admin, and again in the response filters after the handler (which ask the
same). With MLflow's own function each call verifies the password against its stored hash
(scrypt, ~0.12 s of server CPU on an idle machine), so one authenticated REST call cost
three checks (measured on MLflow 3.17 as the admin: ``registered-models/get`` and
``model-versions/search`` each ran the check three times).

:func:`authenticate_once` runs MLflow's own check (``authenticate_request_basic_auth``)
unchanged the first time in a request and keeps a *successful* answer in that request's
WSGI environ, keyed by the request's ``Authorization`` header; later calls within the same
request with the same header return it. Nothing is kept across requests: every request pays
one full check, a wrong or missing password is checked (and refused) every time, and a
password change or a deleted user takes effect on the next request. It is not MLflow's
credential cache (``auth_cache_ttl_seconds``, which skips the check on later requests).

One side effect, from MLflow's UI: it shows its change-password dialog and its log-out link
only when the ini names MLflow's own function. ``MLFLOW_AUTH_FUNCTION=mlflow`` in
``infra/mlflow-server.sh`` restores that (at three checks a request).
"""

from __future__ import annotations

from typing import Any

#: Where the request's answer is kept (the WSGI environ of one request; not an HTTP_ key,
#: so no client header can set it).
_ENVIRON_KEY = "unlearnflow.basic_auth"


def authenticate_once() -> Any:
    """MLflow's ``authenticate_request_basic_auth`` for the current request, verified once:
    its ``Authorization`` on success (kept for the rest of the request), its 401 response
    otherwise (not kept)."""
    from flask import request
    from mlflow.server.auth import authenticate_request_basic_auth
    from werkzeug.datastructures import Authorization

    header = request.headers.get("Authorization")
    kept = request.environ.get(_ENVIRON_KEY)
    if kept is not None and kept[0] == header:
        return kept[1]
    result = authenticate_request_basic_auth()
    if isinstance(result, Authorization):
        request.environ[_ENVIRON_KEY] = (header, result)
    return result
