"""Read-only queries to an MLflow tracking server's Model Registry over its REST API, with
the standard library only.

``unlearn lineage sample`` against a tracking server (``http(s)://``, the production set-up
of ``infra/mlflow-server.sh``) needs a model's versions with their tags and its aliases.
Importing the MLflow client for that costs a fresh process more than a second and a half
(``import mlflow`` loads its GenAI, data and server packages); these two documented
endpoints answer the same question without it:

- ``GET /api/2.0/mlflow/model-versions/search`` (``filter``, ``max_results``, ``page_token``;
  returns ``model_versions`` and ``next_page_token``);
- ``GET /api/2.0/mlflow/registered-models/get`` (``name``; returns ``registered_model``
  with its ``aliases``).

Authentication and TLS follow the MLflow client's environment variables:
``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` (HTTP basic) or
``MLFLOW_TRACKING_TOKEN`` (bearer), ``MLFLOW_TRACKING_INSECURE_TLS=true`` (no certificate
check) or ``MLFLOW_TRACKING_SERVER_CERT_PATH`` (a CA bundle), and
``MLFLOW_TRACKING_CLIENT_CERT_PATH`` (a client certificate). ``MLFLOW_HTTP_REQUEST_TIMEOUT``
(seconds, default 120) bounds each request. Auth plugins (``MLFLOW_TRACKING_AUTH``) are not
supported here, nor is AWS SigV4 signing (``MLFLOW_TRACKING_AWS_SIGV4``): with either set,
:func:`use_rest` says no and callers use the MLflow client.
"""

from __future__ import annotations

import base64
import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field

SEARCH_VERSIONS = "/api/2.0/mlflow/model-versions/search"
GET_MODEL = "/api/2.0/mlflow/registered-models/get"
#: The page size asked for (MLflow's default and the largest a Databricks server accepts).
PAGE = 10_000
#: Answers retried (with a short back-off), as the MLflow client retries them.
RETRY_STATUS = frozenset({429, 502, 503, 504})
RETRIES = 3
_TRUE = {"true", "1", "yes"}


class RestError(RuntimeError):
    """A registry query failed: the server refused it, or could not be reached or read.
    ``not_found``: the server answered ``RESOURCE_DOES_NOT_EXIST``."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code

    @property
    def not_found(self) -> bool:
        return self.code == "RESOURCE_DOES_NOT_EXIST" or self.status == 404


@dataclass(frozen=True)
class VersionRecord:
    """What lineage reads of a model version, whichever way it was read."""

    version: str
    tags: Mapping[str, str] = field(default_factory=dict)
    creation_timestamp: int = 0
    run_id: str | None = None
    source: str = ""


def use_rest(uri: str, environ: Mapping[str, str]) -> bool:
    """Whether ``uri`` is a tracking server this module can query: ``http(s)://``, and
    neither an MLflow auth plugin nor AWS SigV4 signing configured."""
    signed = environ.get("MLFLOW_TRACKING_AWS_SIGV4", "").strip().lower() in _TRUE
    return (
        uri.startswith(("http://", "https://"))
        and not environ.get("MLFLOW_TRACKING_AUTH")
        and not signed
    )


@dataclass(frozen=True)
class Server:
    """A tracking server and how to talk to it (credentials, TLS, timeout), read from the
    same environment variables the MLflow client reads."""

    uri: str
    headers: Mapping[str, str]
    context: ssl.SSLContext | None
    timeout: float

    @classmethod
    def from_env(cls, uri: str, environ: Mapping[str, str]) -> Server:
        if not uri.startswith(("http://", "https://")):
            raise RestError(f"{uri}: not an http(s) tracking server URI")
        headers = {"Accept": "application/json", "User-Agent": "unlearnflow-lineage"}
        user = environ.get("MLFLOW_TRACKING_USERNAME")
        password = environ.get("MLFLOW_TRACKING_PASSWORD")
        token = environ.get("MLFLOW_TRACKING_TOKEN")
        if user is not None and password is not None:
            basic = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
            headers["Authorization"] = f"Basic {basic}"
        elif token:
            headers["Authorization"] = f"Bearer {token}"
        insecure = environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").strip().lower() in _TRUE
        ca = environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH")
        client_cert = environ.get("MLFLOW_TRACKING_CLIENT_CERT_PATH")
        if insecure and ca:
            raise RestError(
                "MLFLOW_TRACKING_INSECURE_TLS and MLFLOW_TRACKING_SERVER_CERT_PATH are both "
                "set: they cannot be used together"
            )
        context = None
        if uri.startswith("https://"):
            try:
                context = ssl.create_default_context(cafile=ca or None)
            except (OSError, ssl.SSLError) as exc:
                raise RestError(
                    f"MLFLOW_TRACKING_SERVER_CERT_PATH: cannot load {ca}: {exc}"
                ) from exc
            if insecure:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            if client_cert:
                try:
                    context.load_cert_chain(client_cert)
                except (OSError, ssl.SSLError) as exc:
                    raise RestError(
                        f"MLFLOW_TRACKING_CLIENT_CERT_PATH: cannot load {client_cert}: {exc}"
                    ) from exc
        raw_timeout = environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
        try:
            timeout = float(raw_timeout)
        except ValueError:
            raise RestError(
                f"MLFLOW_HTTP_REQUEST_TIMEOUT: expected seconds, got {raw_timeout!r}"
            ) from None
        return cls(uri.rstrip("/"), headers, context, timeout)

    def get(self, endpoint: str, query: Mapping[str, str | int]) -> dict:
        """The JSON object ``GET endpoint?query`` answers; :class:`RestError` otherwise."""
        url = f"{self.uri}{endpoint}?{urllib.parse.urlencode(query)}"
        request = urllib.request.Request(url, headers=dict(self.headers), method="GET")
        for attempt in range(RETRIES + 1):
            try:
                with urllib.request.urlopen(
                    request, timeout=self.timeout, context=self.context
                ) as resp:
                    body = resp.read()
                break
            except urllib.error.HTTPError as exc:
                if exc.code in RETRY_STATUS and attempt < RETRIES:
                    time.sleep(0.5 * 2**attempt)
                    continue
                raise self._http_error(exc, endpoint) from None
            except urllib.error.URLError as exc:
                reason = exc.reason
                if isinstance(reason, ssl.SSLError):
                    raise RestError(
                        f"MLflow server {self.uri}: TLS failed ({reason}); give its CA bundle "
                        "in MLFLOW_TRACKING_SERVER_CERT_PATH (or, for a test server only, set "
                        "MLFLOW_TRACKING_INSECURE_TLS=true)"
                    ) from None
                raise RestError(f"cannot reach the MLflow server {self.uri}: {reason}") from None
            except (TimeoutError, ConnectionError) as exc:
                raise RestError(f"MLflow server {self.uri}: {exc or type(exc).__name__}") from None
        try:
            out = json.loads(body or b"{}")
        except ValueError:
            raise RestError(
                f"MLflow server {self.uri}{endpoint}: the answer is not JSON "
                f"({body[:80]!r}); is {self.uri} an MLflow tracking server?"
            ) from None
        if not isinstance(out, dict):
            raise RestError(f"MLflow server {self.uri}{endpoint}: expected a JSON object")
        return out

    def _http_error(self, exc: urllib.error.HTTPError, endpoint: str) -> RestError:
        try:
            payload = json.loads(exc.read() or b"{}")
        except ValueError:
            payload = {}
        payload = payload if isinstance(payload, dict) else {}
        code, message = payload.get("error_code"), payload.get("message")
        if exc.code == 401:
            how = (
                "the credentials in MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD (or "
                "MLFLOW_TRACKING_TOKEN) were refused"
                if "Authorization" in self.headers
                else "it needs credentials: set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
            )
            return RestError(f"MLflow server {self.uri}: 401 unauthorized: {how}", status=401)
        if exc.code == 403:
            return RestError(
                f"MLflow server {self.uri}: 403 permission denied"
                + (f": {message}" if message else ""),
                status=403,
                code=code,
            )
        return RestError(
            message or f"MLflow server {self.uri}{endpoint}: HTTP {exc.code} {exc.reason}",
            status=exc.code,
            code=code,
        )


def _record(raw: Mapping) -> VersionRecord:
    return VersionRecord(
        version=str(raw["version"]),
        tags={t["key"]: t.get("value", "") for t in raw.get("tags") or ()},
        creation_timestamp=int(raw.get("creation_timestamp") or 0),
        run_id=raw.get("run_id") or None,
        source=raw.get("source") or "",
    )


def model_versions(server: Server, name: str) -> dict[str, VersionRecord]:
    """Every version of registered model ``name`` with its tags, by version number (all
    pages of ``model-versions/search``)."""
    found: dict[str, VersionRecord] = {}
    query: dict[str, str | int] = {"filter": f"name = '{name}'", "max_results": PAGE}
    while True:
        page = server.get(SEARCH_VERSIONS, query)
        for raw in page.get("model_versions") or ():
            rec = _record(raw)
            found[rec.version] = rec
        token = page.get("next_page_token")
        if not token:
            return found
        query["page_token"] = token


def model_aliases(server: Server, name: str) -> dict[str, str]:
    """The aliases of registered model ``name`` (alias → version); :class:`RestError` with
    ``not_found`` when there is no such model."""
    model = server.get(GET_MODEL, {"name": name}).get("registered_model") or {}
    return {a["alias"]: str(a["version"]) for a in model.get("aliases") or ()}
