"""ServeSettings on its own: sources, their order, and the errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from allcores.server.app import detect_interface
from allcores.server.settings import ServeSettings, ServeSettingsError


def write_pyproject(folder: Path, table: str) -> None:
    (folder / "pyproject.toml").write_text(f"[project]\nname = 'x'\n\n[tool.allcores]\n{table}\n")


def test_defaults_are_what_a_uvicorn_user_expects(tmp_path: Path) -> None:
    settings = ServeSettings.load({"app": "main:app"}, environ={}, cwd=tmp_path)
    assert (settings.host, settings.port, settings.workers) == ("127.0.0.1", 8000, "auto")
    assert settings.policy == "balanced" and settings.lifespan == "auto"
    assert settings.timeout_keep_alive == 5 and settings.timeout_graceful == 30


def test_command_line_beats_environment_beats_pyproject(tmp_path: Path) -> None:
    write_pyproject(tmp_path, 'app = "main:app"\nport = 9000\nworkers = 3\nlog-level = "debug"')
    environ = {"ALLCORES_PORT": "9100", "ALLCORES_WORKERS": "auto"}
    settings = ServeSettings.load({"port": "9200", "host": None}, environ=environ, cwd=tmp_path)
    assert settings.app == "main:app"  # pyproject only
    assert settings.log_level == "debug"  # pyproject only
    assert settings.workers == "auto"  # environment over pyproject
    assert settings.port == 9200  # command line over both
    assert settings.host == "127.0.0.1"  # not given anywhere: the default


def test_pyproject_is_found_in_a_parent_folder(tmp_path: Path) -> None:
    write_pyproject(tmp_path, 'app = "svc.main:app"')
    inner = tmp_path / "svc" / "deep"
    inner.mkdir(parents=True)
    assert ServeSettings.load({}, environ={}, cwd=inner).app == "svc.main:app"


@pytest.mark.parametrize(
    ("given", "environ", "message"),
    [
        ({"workers": "0"}, {}, "--workers='0': workers must be 'auto'"),
        ({"port": "http"}, {}, "--port='http': port must be a whole number >= 0"),
        ({}, {"ALLCORES_ACCESS_LOG": "maybe"}, "ALLCORES_ACCESS_LOG='maybe': access-log must be"),
        ({}, {"ALLCORES_INTERFACE": "cgi"}, "interface must be one of auto, asgi3, asgi2, wsgi"),
        ({"timeout_graceful": "-1"}, {}, "timeout-graceful must be a number of seconds >= 0"),
        ({"port": "70000"}, {}, "port must be 0 to 65535"),
        ({}, {"ALLCORES_POOL_NICE": "20"}, "pool-nice must be a whole number from 0 to 19"),
        ({"pool_nice": "-5"}, {}, "pool-nice must be a whole number >= 0"),
        ({"bind": "x"}, {}, "unknown option 'bind'"),
    ],
)
def test_a_bad_value_names_its_option_source_and_what_is_valid(
    tmp_path: Path, given: dict[str, str], environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ServeSettingsError) as caught:
        ServeSettings.load({"app": "main:app", **given}, environ=environ, cwd=tmp_path)
    assert message in str(caught.value)


def test_an_unknown_pyproject_key_names_the_file(tmp_path: Path) -> None:
    write_pyproject(tmp_path, 'app = "main:app"\nthreads = 4')
    with pytest.raises(ServeSettingsError, match=r"pyproject.toml \[tool.allcores\] threads"):
        ServeSettings.load({}, environ={}, cwd=tmp_path)


def test_an_app_must_be_named_as_module_and_attribute(tmp_path: Path) -> None:
    with pytest.raises(ServeSettingsError, match="no app given"):
        ServeSettings.load({}, environ={}, cwd=tmp_path)
    with pytest.raises(ServeSettingsError, match="must be MODULE:ATTRIBUTE"):
        ServeSettings.load({"app": "main"}, environ={}, cwd=tmp_path)


def test_tls_files_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ServeSettingsError, match=r"--ssl-certfile 'nope\.pem': no such file"):
        ServeSettings.load({"app": "m:a", "ssl_certfile": "nope.pem"}, environ={}, cwd=tmp_path)
    with pytest.raises(ServeSettingsError, match="--ssl-keyfile needs --ssl-certfile"):
        ServeSettings.load({"app": "m:a", "ssl_keyfile": "k.pem"}, environ={}, cwd=tmp_path)


def test_settings_travel_to_workers_as_json(tmp_path: Path) -> None:
    settings = ServeSettings.load({"app": "main:app", "workers": "4"}, environ={}, cwd=tmp_path)
    assert ServeSettings.from_json(settings.to_json()) == settings

    async def app(scope: object, receive: object, send: object) -> None: ...

    given_object = ServeSettings(app=app)
    assert ServeSettings.from_json(given_object.to_json(), app).app is app


def test_the_interface_is_found_from_how_the_app_is_called() -> None:
    async def asgi3(scope: object, receive: object, send: object) -> None: ...

    def wsgi(environ: object, start_response: object) -> list[bytes]:
        return []

    class Asgi2:
        def __init__(self, scope: object) -> None: ...

    class FlaskLike:
        def __call__(self, environ: object, start_response: object) -> list[bytes]:
            return []

    class StarletteLike:
        async def __call__(self, scope: object, receive: object, send: object) -> None: ...

    assert detect_interface(asgi3) == "asgi3"
    assert detect_interface(StarletteLike()) == "asgi3"
    assert detect_interface(wsgi) == "wsgi"
    assert detect_interface(FlaskLike()) == "wsgi"
    assert detect_interface(Asgi2) == "asgi2"


def test_a_command_finds_the_server_where_serve_would_put_it(tmp_path: Path) -> None:
    write_pyproject(tmp_path, 'app = "main:app"\nport = 9000\nuds = "/run/app.sock"')
    found = ServeSettings.configured("control", "uds", "port", environ={}, cwd=tmp_path)
    assert found == {"uds": "/run/app.sock", "port": 9000}
    environ = {"ALLCORES_PORT": "9100"}
    assert ServeSettings.configured("port", environ=environ, cwd=tmp_path) == {"port": 9100}
