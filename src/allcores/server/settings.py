"""Every option of `allcores serve`, in one validated object, and where each comes from.

::

    defaults (below) ◄── [tool.allcores] in pyproject.toml ◄── ALLCORES_<OPTION>
                     ◄── the command line, or allcores.serve(app, **options)

Each later source wins over the earlier ones, option by option. pyproject.toml is
the first one found from the working directory upwards. Every value, whatever its
source, goes through the same parser, so a bad one is refused before anything
starts, with an error that names the option, where it came from and what is valid.
Nothing else in allcores reads these environment variables.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from allcores.cluster.settings import POLICIES, SettingsError, default_policy

__all__ = ["OPTIONS", "ServeSettings", "ServeSettingsError", "find_pyproject"]

ENV_PREFIX = "ALLCORES_"


class ServeSettingsError(SettingsError):
    """An option of `allcores serve` has a value it cannot take."""


Parser = Callable[[Any], Any]


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false (1/0, yes/no, on/off)")


def _int(low: int) -> Parser:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not str(value).strip().lstrip("-").isdigit():
            raise ValueError(f"must be a whole number >= {low}")
        number = int(value)
        if number < low:
            raise ValueError(f"must be a whole number >= {low}")
        return number

    return parse


def _seconds(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError("must be a number of seconds >= 0") from None
    if not number >= 0:
        raise ValueError("must be a number of seconds >= 0")
    return number


def _choice(*choices: str) -> Parser:
    def parse(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return text

    return parse


def _text(value: Any) -> str:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ValueError("must be text")
    return str(value)


def _optional(parse: Parser) -> Parser:
    def optional(value: Any) -> Any:
        return None if value is None or value == "" else parse(value)

    return optional


def admin_address(text: str) -> tuple[str, int]:
    """``PORT`` (on 127.0.0.1) or ``HOST:PORT`` as (host, port)."""
    host, _, port = text.strip().rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must be PORT or HOST:PORT, for example 9100 or 0.0.0.0:9100")
    return (host.strip("[]") or "127.0.0.1"), int(port)


def _admin(value: Any) -> str:
    text = str(value).strip()
    admin_address(text)
    return text


def _workers(value: Any) -> int | str:
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        return _int(1)(value)  # type: ignore[no-any-return]
    except ValueError:
        raise ValueError("must be 'auto' (one per usable CPU) or a whole number >= 1") from None


def _nice(value: Any) -> int:
    number: int = _int(0)(value)
    if number > 19:
        raise ValueError("must be a whole number from 0 to 19 (the range of nice)")
    return number


def _pool(value: Any) -> int | str:
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        return _int(0)(value)  # type: ignore[no-any-return]
    except ValueError:
        raise ValueError(
            "must be 'auto' (one per usable CPU), a whole number, or 0 for no shared pool"
        ) from None


@dataclasses.dataclass
class ServeSettings:
    """The options of `allcores serve`; `docs/serve.md` lists each with its sources."""

    app: Any = None
    """``"module:attribute"`` (or, from Python, the app itself)."""
    factory: bool = False
    interface: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    uds: str | None = None
    """Serve on this UNIX socket instead of host and port (a proxy in front)."""
    workers: int | str = "auto"
    pool: int | str = "auto"
    """Processes of the CPU pool all workers share (`offload`); 0: none, each worker
    then makes its own local pool on first `offload`."""
    pool_queue: int = 1024
    """Tasks that may wait for a pool process; one more fails with QueueFullError."""
    pool_nice: int = 5
    """How much lower than the HTTP workers the pool processes run (0-19): at 5 the
    kernel weighs a worker 3x a pool process, so requests win a contended core; 0
    gives offloaded work an equal share."""
    engine: str = "uvicorn"
    """The HTTP engine of each worker: uvicorn's protocol, or granian's Rust core."""
    preload: bool = False
    """Import the app once, in the primary, and fork the workers from it."""
    policy: str = dataclasses.field(default_factory=default_policy)
    app_dir: str = "."
    root_path: str = ""
    proxy_headers: bool = True
    forwarded_allow_ips: str | None = None
    log_level: str = "info"
    access_log: bool = True
    http: str = "auto"
    ws: str = "auto"
    lifespan: str = "auto"
    timeout_keep_alive: float = 5.0
    timeout_graceful: float = 30.0
    timeout_hung: float = 30.0
    warn_blocking: float = 0.1
    max_requests: int = 0
    max_requests_jitter: int = 0
    max_rss: float = 0.0
    max_lifetime: float = 0.0
    timeout_header: float = 20.0
    limit_request_line: int = 8190
    limit_request_field_size: int = 8190
    limit_request_fields: int = 100
    limit_concurrency: int | None = None
    backlog: int = 2048
    wsgi_threads: int = 10
    admin: str | None = None
    """``PORT`` or ``HOST:PORT`` of the admin endpoint (/metrics, /status, /healthz,
    /readyz); off when None. A bare port binds 127.0.0.1."""
    control: str | None = None
    """The control socket's path; None: `allcores.control.client.default_path`."""
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_keyfile_password: str | None = None

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if name != "app":
                setattr(self, name, _parse(name, value, name))
        self.validate()

    @classmethod
    def configured(
        cls, *names: str, environ: Mapping[str, str] | None = None, cwd: Path | None = None
    ) -> dict[str, Any]:
        """The values of *names* that pyproject.toml or ``ALLCORES_*`` set (the later
        wins), parsed; for a command that finds a running server (`allcores status`)."""
        environ = os.environ if environ is None else environ
        found: dict[str, Any] = {}
        pyproject = find_pyproject(cwd or Path.cwd())
        table = _tool_table(pyproject) if pyproject is not None else {}
        for name in names:
            for key in (name, name.replace("_", "-")):
                if key in table:
                    found[name] = _parse(name, table[key], f"{pyproject} [tool.allcores] {key}")
            variable = ENV_PREFIX + name.upper()
            if variable in environ:
                found[name] = _parse(name, environ[variable], variable)
        return found

    @classmethod
    def load(
        cls,
        given: Mapping[str, Any],
        *,
        environ: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> ServeSettings:
        """Settings from the defaults, pyproject.toml, ``ALLCORES_*`` and *given*
        (the command line's options, None where not given), in that order."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        pyproject = find_pyproject(cwd or Path.cwd())
        if pyproject is not None:
            for key, value in _tool_table(pyproject).items():
                name = key.replace("-", "_")
                source = f"{pyproject} [tool.allcores] {key}"
                if name not in OPTIONS:
                    raise ServeSettingsError(f"{source}: no such option; valid: {_names()}")
                values[name] = _parse(name, value, source)
        for name in OPTIONS:
            variable = ENV_PREFIX + name.upper()
            if variable in environ:
                values[name] = _parse(name, environ[variable], variable)
        for name, value in given.items():
            if value is None:
                continue
            if name not in OPTIONS:
                raise ServeSettingsError(f"unknown option {name!r}; valid: {_names()}")
            values[name] = _parse(name, value, "--" + name.replace("_", "-"))
        return cls(**values)

    def validate(self) -> None:
        if self.app is None or self.app == "":
            raise ServeSettingsError(
                "no app given: name it as MODULE:ATTRIBUTE (allcores serve main:app), "
                "or set app in [tool.allcores] or ALLCORES_APP"
            )
        if isinstance(self.app, str) and (":" not in self.app or self.app.startswith(":")):
            raise ServeSettingsError(
                f"app {self.app!r} must be MODULE:ATTRIBUTE, for example main:app"
            )
        if self.engine == "granian" and self.policy in ("balanced", "rr"):
            raise ServeSettingsError(
                f"--engine granian accepts connections itself, so --policy {self.policy} "
                "(the primary accepts) cannot feed it: add --policy shared (or reuseport)"
            )
        if self.engine == "granian" and self.http == "h11":
            raise ServeSettingsError("--engine granian has its own HTTP parser: drop --http h11")
        if self.port > 65535:
            raise ServeSettingsError(f"port must be 0 to 65535, got {self.port}")
        if self.ssl_keyfile and not self.ssl_certfile:
            raise ServeSettingsError("--ssl-keyfile needs --ssl-certfile too")
        for name in ("ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ServeSettingsError(f"--{name.replace('_', '-')} {path!r}: no such file")

    @property
    def listen_address(self) -> tuple[str, int]:
        """(host, port) as the cluster takes it: ``("unix:/abs/path", 0)`` for --uds."""
        if self.uds:
            return "unix:" + os.path.abspath(self.uds), 0
        return self.host, self.port

    @property
    def url(self) -> str:
        if self.uds:
            return f"unix:{os.path.abspath(self.uds)}"
        scheme = "https" if self.ssl_certfile else "http"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def app_name(self) -> str:
        """How the app is named in logs and process titles."""
        if isinstance(self.app, str):
            return self.app
        return getattr(self.app, "__qualname__", None) or type(self.app).__name__

    def to_json(self) -> str:
        """The settings for a worker; an app given as an object stays in the program."""
        fields = dataclasses.asdict(self)
        fields["app"] = self.app if isinstance(self.app, str) else None
        return json.dumps(fields)

    @classmethod
    def from_json(cls, text: str, app: Any = None) -> ServeSettings:
        fields = json.loads(text)
        if app is not None:
            fields["app"] = app
        return cls(**fields)


OPTIONS: dict[str, Parser] = {
    "app": _text,
    "factory": _bool,
    "interface": _choice("auto", "asgi3", "asgi2", "wsgi"),
    "host": _text,
    "port": _int(0),
    "uds": _optional(_text),
    "workers": _workers,
    "pool": _pool,
    "pool_queue": _int(1),
    "pool_nice": _nice,
    "engine": _choice("uvicorn", "granian"),
    "preload": _bool,
    "policy": _choice(*POLICIES),
    "app_dir": _text,
    "root_path": _text,
    "proxy_headers": _bool,
    "forwarded_allow_ips": _optional(_text),
    "log_level": _choice("critical", "error", "warning", "info", "debug", "trace"),
    "access_log": _bool,
    "http": _choice("auto", "httptools", "h11"),
    "ws": _choice("auto", "websockets", "wsproto", "none"),
    "lifespan": _choice("auto", "on", "off"),
    "timeout_keep_alive": _seconds,
    "timeout_graceful": _seconds,
    "timeout_hung": _seconds,
    "warn_blocking": _seconds,
    "max_requests": _int(0),
    "max_requests_jitter": _int(0),
    "max_rss": _seconds,
    "max_lifetime": _seconds,
    "timeout_header": _seconds,
    "limit_request_line": _int(64),
    "limit_request_field_size": _int(64),
    "limit_request_fields": _int(1),
    "limit_concurrency": _optional(_int(1)),
    "backlog": _int(1),
    "wsgi_threads": _int(1),
    "admin": _optional(_admin),
    "control": _optional(_text),
    "ssl_certfile": _optional(_text),
    "ssl_keyfile": _optional(_text),
    "ssl_keyfile_password": _optional(_text),
}


def _names() -> str:
    return ", ".join(name.replace("_", "-") for name in OPTIONS)


def _parse(name: str, value: Any, source: str) -> Any:
    if name == "app" and value is not None and not isinstance(value, str):
        return value  # the app itself, given from Python
    try:
        return OPTIONS[name](value)
    except ValueError as exc:
        raise ServeSettingsError(f"{source}={value!r}: {name.replace('_', '-')} {exc}") from None


def find_pyproject(start: Path) -> Path | None:
    """The pyproject.toml of *start* or of the nearest folder above it."""
    for folder in (start, *start.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def _tool_table(pyproject: Path) -> dict[str, Any]:
    try:
        with pyproject.open("rb") as file:
            data = tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ServeSettingsError(f"cannot read {pyproject}: {exc}") from exc
    table = data.get("tool", {}).get("allcores", {})
    if not isinstance(table, dict):
        raise ServeSettingsError(f"{pyproject}: [tool.allcores] must be a table")
    return table
