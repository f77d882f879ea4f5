"""load_config: typed sections, errors that name file, line and option, environment overrides."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mailsuite.config import (
    AuthConfig,
    Config,
    ConfigError,
    DatabaseConfig,
    DNSConfig,
    ListenConfig,
    MXConfig,
    ServerConfig,
    SMTPConfig,
    TLSConfig,
    load_config,
)
from tests.harness import REPO


def write(tmp_path: Path, text: str, name: str = "mailsuite.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path | None, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={} if environ is None else environ)
    message = str(caught.value)
    assert "\n" not in message.strip(), message
    return message


def test_no_file_gives_the_documented_defaults() -> None:
    config = load_config(None, environ={})
    assert config == Config()
    assert config.server == ServerConfig(hostname="localhost", data_dir="var")
    assert config.database.pool_size == 8 and config.database.batch_max == 128
    assert config.listen.mx == "tcp:2525:interface=127.0.0.1"
    assert config.smtp.max_command_line == 1000
    assert config.smtp.max_message_size == 26214400
    assert config.smtp.max_recipients == 100
    assert config.mx.auth_checks is True
    assert config.auth.allow_plaintext is False and config.auth.bcrypt_rounds == 12
    assert config.tls == TLSConfig(cert="", key="")
    assert config.database_url == f"sqlite:///{Path('var') / 'mailsuite.db'}"


def test_an_empty_file_gives_the_defaults_and_remembers_its_path(tmp_path: Path) -> None:
    path = write(tmp_path, "# nothing set\n")
    config = load_config(path, environ={})
    assert dataclasses.replace(config, path="") == Config()
    assert config.path == str(path)


def test_the_shipped_example_config_loads_with_every_default(tmp_path: Path) -> None:
    shipped = REPO / "conf" / "mailsuite.toml"
    if not shipped.exists():
        pytest.fail(f"{shipped} is missing")
    config = load_config(shipped, environ={})
    assert dataclasses.replace(config, path="") == Config()


def test_every_section_is_read_into_its_typed_dataclass(tmp_path: Path) -> None:
    path = write(tmp_path, """
[server]
hostname = "mx.example.org"
data_dir = "/srv/mail"

[database]
url = "postgresql://mail@db.example.org/mail"
pool_size = 3
batch_max = 16

[listen]
mx = "tcp:25"

[tls]
cert = "/etc/tls/chain.pem"
key = "/etc/tls/key.pem"

[dns]
resolver = "127.0.0.53:5353"
timeout = 2

[smtp]
max_command_line = 2048
max_message_size = 1048576
max_recipients = 50
max_connections_per_ip = 5
max_junk_commands = 7
idle_timeout = 60
greeting_delay = 0.25
max_received_headers = 30

[mx]
auth_checks = false

[auth]
allow_plaintext = true
bcrypt_rounds = 10
""")
    config = load_config(path, environ={})
    assert config.server == ServerConfig("mx.example.org", "/srv/mail")
    assert config.database == DatabaseConfig("postgresql://mail@db.example.org/mail", 3, 16)
    assert config.database_url == "postgresql://mail@db.example.org/mail"
    assert config.data_path == Path("/srv/mail")
    assert config.listen == ListenConfig("tcp:25")
    assert config.tls == TLSConfig("/etc/tls/chain.pem", "/etc/tls/key.pem")
    assert config.dns == DNSConfig("127.0.0.53:5353", 2.0)
    assert config.smtp == SMTPConfig(2048, 1048576, 50, 5, 7, 60.0, 0.25, 30)
    assert config.mx == MXConfig(auth_checks=False)
    assert config.auth == AuthConfig(allow_plaintext=True, bcrypt_rounds=10)
    # Integers given for float options come back as floats, so the types are always the same.
    for value in (config.dns.timeout, config.smtp.idle_timeout, config.smtp.greeting_delay):
        assert type(value) is float
    for value in (config.smtp.max_command_line, config.database.pool_size):
        assert type(value) is int
    assert config.mx.auth_checks is False and config.auth.allow_plaintext is True


def test_an_empty_database_url_means_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\ndata_dir = "/srv/mail"\n[database]\nurl = ""\n')
    assert load_config(path, environ={}).database_url == "sqlite:////srv/mail/mailsuite.db"


def test_unknown_section_names_the_file_line_and_section(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nhostname = "a.example"\n\n[smpt]\nmax_recipients = 5\n')
    message = config_error(path)
    assert f"{path}:4:" in message
    assert "smpt" in message


def test_unknown_option_names_the_file_line_and_option(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nhostname = "a.example"\n\n[smtp]\n'
                           'max_recipients = 5\nmax_comand_line = 1000\n')
    message = config_error(path)
    assert f"{path}:6:" in message
    assert "smtp.max_comand_line" in message
    assert "unknown option" in message


def test_unknown_option_in_a_later_section_with_the_same_key_finds_the_right_line(
        tmp_path: Path) -> None:
    # `timeout` is a real option of [dns]; in [smtp] it is unknown and must be placed there.
    path = write(tmp_path, '[dns]\ntimeout = 1.0\n\n[smtp]\ntimeout = 5\n')
    message = config_error(path)
    assert f"{path}:5:" in message and "smtp.timeout" in message


def test_option_outside_any_section_names_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, '# comment\nhostname = "a.example"\n')
    message = config_error(path)
    assert "hostname" in message
    assert f"{path}:2:" in message, message


@pytest.mark.parametrize(("section", "line", "option", "expected"), [
    ("smtp", 'max_command_line = "big"', "smtp.max_command_line", "integer"),
    ("smtp", "max_recipients = 1.5", "smtp.max_recipients", "integer"),
    ("smtp", "max_recipients = true", "smtp.max_recipients", "integer"),
    ("dns", 'timeout = "soon"', "dns.timeout", "number"),
    ("mx", 'auth_checks = "yes"', "mx.auth_checks", "true or false"),
    ("mx", "auth_checks = 1", "mx.auth_checks", "true or false"),
    ("server", "hostname = 42", "server.hostname", "string"),
])
def test_wrong_type_names_the_file_line_option_and_expected_type(
        tmp_path: Path, section: str, line: str, option: str, expected: str) -> None:
    path = write(tmp_path, f'[server]\ndata_dir = "var"\n\n[{section}]\n# the bad one:\n{line}\n')
    if section == "server":
        path = write(tmp_path, f'# the bad one:\n\n\n[server]\n\n{line}\n')
    message = config_error(path)
    assert f"{path}:6:" in message
    assert option in message and expected in message


def test_a_section_that_is_not_a_table_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, 'smtp = 5\n')
    message = config_error(path)
    assert str(path) in message and "smtp" in message


def test_toml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nhostname = "a.example"\ndata_dir = \n[smtp]\n')
    message = config_error(path)
    assert str(path) in message
    assert re.search(r"\bline 3\b", message), message


def test_unreadable_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    message = config_error(path)
    assert str(path) in message and "cannot read" in message


def test_non_utf8_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[server]\nhostname = "caf\xe9.example"\n')
    message = config_error(path)
    assert str(path) in message and "UTF-8" in message


def test_environment_overrides_database_url_and_mx_listener(tmp_path: Path) -> None:
    path = write(tmp_path, '[database]\nurl = "sqlite:///file.db"\n[listen]\nmx = "tcp:2525"\n')
    config = load_config(path, environ={
        "MAILSUITE_DATABASE_URL": "postgresql://u@h/db",
        "MAILSUITE_LISTEN_MX": "tcp:25:interface=0.0.0.0",
    })
    assert config.database.url == "postgresql://u@h/db"
    assert config.database_url == "postgresql://u@h/db"
    assert config.listen.mx == "tcp:25:interface=0.0.0.0"
    # Without the variables the file's values stand.
    plain = load_config(path, environ={})
    assert plain.database.url == "sqlite:///file.db" and plain.listen.mx == "tcp:2525"


def test_environment_overrides_apply_without_a_file_and_are_typed() -> None:
    config = load_config(None, environ={
        "MAILSUITE_LISTEN_MX": "",
        "MAILSUITE_SMTP_MAX_RECIPIENTS": "7",
        "MAILSUITE_DNS_TIMEOUT": "0.5",
        "MAILSUITE_MX_AUTH_CHECKS": "off",
        "MAILSUITE_UNRELATED": "ignored",
    })
    assert config.listen.mx == ""
    assert config.smtp.max_recipients == 7 and type(config.smtp.max_recipients) is int
    assert config.dns.timeout == 0.5
    assert config.mx.auth_checks is False


def test_the_environ_argument_replaces_the_process_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILSUITE_LISTEN_MX", "tcp:9999")
    assert load_config(None, environ={}).listen.mx == ListenConfig().mx
    assert load_config(None).listen.mx == "tcp:9999"


def test_bad_environment_value_names_the_variable() -> None:
    message = config_error(None, {"MAILSUITE_SMTP_MAX_RECIPIENTS": "lots"})
    assert "MAILSUITE_SMTP_MAX_RECIPIENTS" in message
    message = config_error(None, {"MAILSUITE_MX_AUTH_CHECKS": "maybe"})
    assert "MAILSUITE_MX_AUTH_CHECKS" in message


def test_max_command_line_below_512_is_refused_naming_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[smtp]\nmax_recipients = 10\nmax_command_line = 511\n')
    message = config_error(path)
    assert f"{path}:3:" in message and "smtp.max_command_line" in message
    assert load_config(write(tmp_path, "[smtp]\nmax_command_line = 512\n", "ok.toml"),
                       environ={}).smtp.max_command_line == 512


def test_tls_cert_without_key_is_refused_naming_the_file_line_and_option(
        tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nhostname = "a.example"\n[tls]\ncert = "/etc/chain.pem"\n')
    message = config_error(path)
    assert "tls.key" in message or "tls.cert" in message
    # The file and a real line number (the [tls] section or the cert line), never "None".
    assert re.search(rf"{re.escape(str(path))}:[34]:", message), message


def test_tls_key_without_cert_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, '[tls]\nkey = "/etc/key.pem"\n')
    message = config_error(path)
    assert "tls.cert" in message or "tls.key" in message


@pytest.mark.parametrize(("text", "option"), [
    ('[server]\nhostname = ""\n', "server.hostname"),
    ('[server]\nhostname = "two words"\n', "server.hostname"),
    ('[database]\nurl = "mysql://u@h/db"\n', "database.url"),
    ("[database]\npool_size = 0\n", "database.pool_size"),
    ("[database]\nbatch_max = 0\n", "database.batch_max"),
    ("[smtp]\nmax_recipients = 0\n", "smtp.max_recipients"),
    ("[smtp]\nmax_message_size = -1\n", "smtp.max_message_size"),
    ("[auth]\nbcrypt_rounds = 3\n", "auth.bcrypt_rounds"),
    ("[auth]\nbcrypt_rounds = 32\n", "auth.bcrypt_rounds"),
    ('[dns]\nresolver = "1.2.3.4:53 extra"\n', "dns.resolver"),
    ("[smtp]\nmax_header_field_size = 100\n", "smtp.max_header_field_size"),
    ("[smtp]\nmax_header_field_size = 2000000\n", "smtp.max_header_field_size"),
    ("[smtp]\nmax_header_fields = 0\n", "smtp.max_header_fields"),
    ("[smtp]\ncommand_timeout = 0\n", "smtp.command_timeout"),
    ("[smtp]\nmin_data_rate = 0\n", "smtp.min_data_rate"),
    ("[smtp]\nmax_session_time = -1\n", "smtp.max_session_time"),
    ("[smtp]\ncommit_timeout = 0\n", "smtp.commit_timeout"),
    ("[imap]\nlogin_timeout = 0\n", "imap.login_timeout"),
    ("[pop3]\ncommand_timeout = 0\n", "pop3.command_timeout"),
    ("[api]\nmax_body = 10\n", "api.max_body"),
    ("[api]\nrate_limit = -1\n", "api.rate_limit"),
    ("[api]\nrequest_timeout = 0\n", "api.request_timeout"),
    ("[api]\nmin_data_rate = 0\n", "api.min_data_rate"),
])
def test_invalid_values_are_refused_naming_file_line_and_option(
        tmp_path: Path, text: str, option: str) -> None:
    path = write(tmp_path, text)
    message = config_error(path)
    assert f"{path}:2:" in message and option in message


def test_valid_resolver_forms_are_accepted(tmp_path: Path) -> None:
    for resolver in ("127.0.0.1", "127.0.0.1:5353", "[::1]:53", "ns.example.org"):
        path = write(tmp_path, f'[dns]\nresolver = "{resolver}"\n')
        assert load_config(path, environ={}).dns.resolver == resolver


def test_twistd_with_a_bad_config_exits_nonzero_naming_file_line_and_option(
        tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nhostname = "mx.example"\ndata_dir = "var"\n\n'
                           '[smtp]\nmax_recipients = 10\nmax_comand_line = 1000\n')
    twistd = str(Path(sys.executable).parent / "twistd")
    result = subprocess.run([twistd, "-n", "--pidfile=", "mailsuite", "--config", str(path)],
                            cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True,
                            timeout=60)
    output = (result.stdout + result.stderr).decode("utf-8", "replace")
    assert result.returncode != 0, output
    assert f"{path}:7:" in output, output
    assert "smtp.max_comand_line" in output
    assert "Traceback" not in output, output
    assert not (tmp_path / "var").exists()  # it never got as far as creating the data dir
