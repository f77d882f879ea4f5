"""One typed configuration, loaded from a TOML file with MAILSUITE_* environment overrides.

Every section is a frozen dataclass; the loader checks names and types so that a typo in
the file is an error naming the file, the line and the option, never a silent default.
"""

from __future__ import annotations

import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file, line and option."""


@dataclass(frozen=True)
class ServerConfig:
    hostname: str = "localhost"
    data_dir: str = "var"
    reuse_port: bool = False


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = ""  # empty: sqlite:///<data_dir>/mailsuite.db
    pool_size: int = 8
    batch_max: int = 128


@dataclass(frozen=True)
class ListenConfig:
    mx: str = "tcp:2525:interface=127.0.0.1"
    pop3: str = "tcp:1110:interface=127.0.0.1"
    pop3s: str = "tcp:1995:interface=127.0.0.1"
    imap: str = "tcp:1143:interface=127.0.0.1"
    imaps: str = "tcp:1993:interface=127.0.0.1"
    submission: str = "tcp:1587:interface=127.0.0.1"
    submissions: str = "tcp:1465:interface=127.0.0.1"
    http: str = "tcp:8080:interface=127.0.0.1"
    metrics: str = ""


@dataclass(frozen=True)
class TLSConfig:
    cert: str = ""
    key: str = ""


@dataclass(frozen=True)
class DNSConfig:
    resolver: str = ""
    timeout: float = 5.0


@dataclass(frozen=True)
class SMTPConfig:
    max_command_line: int = 1000
    max_message_size: int = 26214400
    max_recipients: int = 100
    max_connections_per_ip: int = 20
    max_junk_commands: int = 20
    idle_timeout: float = 300.0
    greeting_delay: float = 0.5
    max_received_headers: int = 60
    max_header_field_size: int = 102400  # Postfix's header_size_limit
    max_header_size: int = 1048576  # Exim's header_maxsize
    max_header_fields: int = 1000
    command_timeout: float = 60.0  # a command line, from its first octet to its CRLF
    min_data_rate: int = 500  # octets/s buying DATA time, as Postfix's smtpd_min_data_rate
    max_session_time: float = 3600.0
    commit_timeout: float = 120.0  # a message's commit; then rolled back and 451


@dataclass(frozen=True)
class MXConfig:
    auth_checks: bool = True
    #: apply DMARC p=reject (550 after DATA) and p=quarantine (into Junk), and defer (451)
    #: a message whose p=reject check met a temporary DNS failure
    dmarc_enforce: bool = True
    #: From domains (and their subdomains) whose DMARC failures are recorded, never enforced
    dmarc_exempt: str = ""
    #: domains whose passing ARC seal (the newest in the chain) overrides a DMARC failure
    arc_trusted_sealers: str = ""

    @property
    def dmarc_exempt_domains(self) -> frozenset[str]:
        return domain_set(self.dmarc_exempt)

    @property
    def arc_trusted_domains(self) -> frozenset[str]:
        return domain_set(self.arc_trusted_sealers)


def domain_set(text: str) -> frozenset[str]:
    """Domains listed in `text`, separated by spaces or commas, lower-cased."""
    return frozenset(d.lower().rstrip(".") for d in text.replace(",", " ").split())


@dataclass(frozen=True)
class POP3Config:
    idle_timeout: float = 600.0
    max_connections_per_ip: int = 20
    login_timeout: float = 180.0
    command_timeout: float = 60.0


@dataclass(frozen=True)
class IMAPConfig:
    idle_timeout: float = 1860.0  # RFC 2177: clients re-IDLE every 29 minutes
    max_connections_per_ip: int = 50
    max_connections_per_account: int = 20
    max_line: int = 65536
    max_literal: int = 65536  # except APPEND, bounded by smtp.max_message_size
    search_timeout: float = 30.0  # seconds one SEARCH may work before NO [LIMIT]
    login_timeout: float = 180.0  # as Dovecot's login processes
    command_timeout: float = 60.0


@dataclass(frozen=True)
class DeliveryConfig:
    port: int = 25  # the port remote MX servers are contacted on
    max_connections: int = 100
    max_connections_per_domain: int = 5
    max_messages_per_connection: int = 100
    retry_schedule: str = "5m 10m 30m 1h 2h 4h 8h"  # the last delay repeats until expiry
    expire_after: str = "5d"
    poll_interval: float = 1.0
    claim_batch: int = 200
    claim_timeout: float = 900.0  # a claim older than this is another process's to retry
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    require_tls: str = ""  # domains whose MX must offer STARTTLS with a verified certificate
    ca_file: str = ""  # CA bundle for verified TLS (empty: the system's)
    helo_name: str = ""  # empty: server.hostname

    @property
    def retry_delays(self) -> tuple[float, ...]:
        return tuple(parse_duration(part) for part in self.retry_schedule.split())

    @property
    def expire_seconds(self) -> float:
        return parse_duration(self.expire_after)

    @property
    def tls_required_domains(self) -> frozenset[str]:
        return frozenset(d.lower().rstrip(".") for d in self.require_tls.replace(",", " ").split())


@dataclass(frozen=True)
class RelayConfig:
    host: str = ""  # set: every remote recipient goes through this smarthost
    port: int = 587
    tls: str = "starttls"  # none, starttls or implicit
    verify: bool = True  # check the smarthost's certificate (against delivery.ca_file)
    username: str = ""
    password: str = ""


@dataclass(frozen=True)
class DKIMConfig:
    rsa_bits: int = 2048
    ed25519: bool = False  # a second, Ed25519 signature (RFC 8463) for new keys


@dataclass(frozen=True)
class AuthConfig:
    allow_plaintext: bool = False
    bcrypt_rounds: int = 12
    max_failures: int = 10  # failed logins from one address before it cools off
    cool_off: float = 900.0  # seconds an address over its budget is refused at the greeting
    max_logins_in_flight: int = 2  # per address (IPv6: per /64); more wait their turn
    password_threads: int = 2  # threads that run bcrypt, apart from the store's


@dataclass(frozen=True)
class LimitsConfig:
    handshake_timeout: float = 20.0  # a TLS handshake not done by then is aborted
    write_stall_timeout: float = 60.0  # output not drained (or a close not done) by then


@dataclass(frozen=True)
class APIConfig:
    max_body: int = 36700160  # 35 MiB: a 25 MiB message as base64 JSON, with room
    rate_limit: int = 600  # requests a minute per API key, per process; 0: no limit
    request_timeout: float = 30.0  # a request's line, headers and body, from its first octet
    min_data_rate: int = 500  # octets/s of a request body that buy more time


@dataclass(frozen=True)
class Config:
    path: str = ""
    server: ServerConfig = field(default_factory=ServerConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    listen: ListenConfig = field(default_factory=ListenConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    dns: DNSConfig = field(default_factory=DNSConfig)
    smtp: SMTPConfig = field(default_factory=SMTPConfig)
    mx: MXConfig = field(default_factory=MXConfig)
    pop3: POP3Config = field(default_factory=POP3Config)
    imap: IMAPConfig = field(default_factory=IMAPConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    dkim: DKIMConfig = field(default_factory=DKIMConfig)
    api: APIConfig = field(default_factory=APIConfig)

    @property
    def data_path(self) -> Path:
        """data_dir; a relative one is taken from the working directory, as twistd runs."""
        return Path(self.server.data_dir)

    @property
    def database_url(self) -> str:
        if self.database.url:
            return self.database.url
        return f"sqlite:///{self.data_path / 'mailsuite.db'}"


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds in "90", "90s", "5m", "2h" or "5d"; ValueError otherwise."""
    match = _DURATION.match(text.strip().lower())
    if match is None:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 5m, 2h, 5d)")
    return float(match.group(1)) * _UNITS[match.group(2)]


_SECTIONS: dict[str, type] = {
    name: hint for name, hint in typing.get_type_hints(Config).items() if name != "path"
}


def _where(name: str, line: int | None) -> str:
    return f"{name}:{line}" if line else name


def _locate(text: str, section: str | None, key: str | None) -> int | None:
    """The 1-based line of `key` inside `[section]` (None: before any section header),
    or of the section header itself when key is None."""
    current = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        header = re.match(r"^\[\s*([A-Za-z0-9_.-]+)\s*\]", line)
        if header:
            current = header.group(1)
            if key is None and current == section:
                return number
            continue
        if current == section and key is not None and re.match(rf"^{re.escape(key)}\s*=", line):
            return number
    return None


def _coerce(value: Any, wanted: type, where: str) -> Any:
    if wanted is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if wanted is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if wanted is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if isinstance(value, str):
        return value
    raise ConfigError(f"{where}: expected a string, got {value!r}")


def _from_env(raw: str, wanted: type, where: str) -> Any:
    if wanted is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {raw!r}")
    try:
        return wanted(raw)
    except ValueError as exc:
        raise ConfigError(f"{where}: expected {wanted.__name__}, got {raw!r}") from exc


def _field_types(cls: type) -> dict[str, type]:
    return typing.get_type_hints(cls)


def load_config(path: str | os.PathLike[str] | None,
                environ: dict[str, str] | None = None) -> Config:
    """Read the TOML file at `path` (None: defaults only), then apply MAILSUITE_* overrides."""
    environ = dict(os.environ if environ is None else environ)
    text = ""
    data: dict[str, Any] = {}
    name = str(path) if path else "<defaults>"
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{name}: cannot read: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{name}: not UTF-8 text") from exc
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{name}: {exc}") from exc

    sections: dict[str, Any] = {}
    for section, values in data.items():
        if not isinstance(values, dict):
            line = _locate(text, None, section)
            raise ConfigError(f"{_where(name, line)}: option {section} is outside any [section]")
        if section not in _SECTIONS:
            line = _locate(text, section, None)
            raise ConfigError(f"{_where(name, line)}: unknown section [{section}]")
        types = _field_types(_SECTIONS[section])
        parsed = {}
        for key, value in values.items():
            where = f"{_where(name, _locate(text, section, key))}: option {section}.{key}"
            if key not in types:
                raise ConfigError(f"{where}: unknown option")
            parsed[key] = _coerce(value, types[key], where)
        sections[section] = parsed

    for section, cls in _SECTIONS.items():
        for key, wanted in _field_types(cls).items():
            env_name = f"MAILSUITE_{section}_{key}".upper()
            if env_name in environ:
                where = f"environment variable {env_name}"
                sections.setdefault(section, {})[key] = _from_env(environ[env_name], wanted, where)

    config = Config(path=str(path or ""), **{s: _SECTIONS[s](**v) for s, v in sections.items()})
    _validate(config, name, text)
    return config


def _validate(config: Config, name: str, text: str) -> None:
    def fail(section: str, key: str, message: str) -> None:
        line = _locate(text, section, key)
        raise ConfigError(f"{_where(name, line)}: option {section}.{key}: {message}")

    if not config.server.hostname or " " in config.server.hostname:
        fail("server", "hostname", "must be a host name")
    url = config.database_url
    if not (url.startswith("sqlite:") or url.startswith("postgresql")):
        fail("database", "url", "must be a sqlite:/// or postgresql:// URL")
    if config.api.max_body < 1024:
        fail("api", "max_body", "must be at least 1024")
    if config.api.rate_limit < 0:
        fail("api", "rate_limit", "must be 0 (no limit) or more")
    if config.api.request_timeout <= 0:
        fail("api", "request_timeout", "must be positive")
    if config.api.min_data_rate < 1:
        fail("api", "min_data_rate", "must be at least 1")
    if config.tls.cert and not config.tls.key:
        fail("tls", "cert", "needs tls.key as well")
    if config.tls.key and not config.tls.cert:
        fail("tls", "key", "needs tls.cert as well")
    if config.dns.resolver and not re.fullmatch(r"[^\s:]+(:\d+)?|\[[0-9a-fA-F:]+\](:\d+)?",
                                                config.dns.resolver):
        fail("dns", "resolver", "must be host or host:port")
    for key in ("max_command_line", "max_message_size", "max_recipients",
                "max_connections_per_ip", "max_junk_commands", "max_received_headers",
                "max_header_fields", "min_data_rate"):
        if getattr(config.smtp, key) < 1:
            fail("smtp", key, "must be at least 1")
    for key in ("max_header_field_size", "max_header_size"):
        if getattr(config.smtp, key) < 998:
            fail("smtp", key, "must be at least 998 (RFC 5322 2.1.1 line length)")
    if config.smtp.max_header_field_size > config.smtp.max_header_size:
        fail("smtp", "max_header_field_size", "must not exceed smtp.max_header_size")
    for section, key in (("smtp", "idle_timeout"), ("smtp", "command_timeout"),
                         ("smtp", "max_session_time"), ("smtp", "commit_timeout"),
                         ("pop3", "login_timeout"), ("pop3", "command_timeout"),
                         ("imap", "login_timeout"), ("imap", "command_timeout")):
        if getattr(getattr(config, section), key) <= 0:
            fail(section, key, "must be positive")
    if config.smtp.max_command_line < 512:
        fail("smtp", "max_command_line", "RFC 5321 needs at least 512")
    if config.server.reuse_port:
        from mailsuite.listeners import parse_tcp_endpoint

        for key in ("mx", "pop3", "pop3s", "imap", "imaps", "submission", "submissions"):
            value = getattr(config.listen, key)
            if value and parse_tcp_endpoint(value) is None:
                fail("listen", key, "with server.reuse_port, use a tcp: or tcp6: endpoint")
    for key in ("dmarc_exempt", "arc_trusted_sealers"):
        for domain in domain_set(getattr(config.mx, key)):
            if not re.fullmatch(r"[a-z0-9_.-]+\.[a-z0-9-]+", domain):
                fail("mx", key, f"{domain!r} is not a domain name")
    if config.pop3.idle_timeout <= 0:
        fail("pop3", "idle_timeout", "must be positive")
    if config.pop3.max_connections_per_ip < 1:
        fail("pop3", "max_connections_per_ip", "must be at least 1")
    for key in ("max_connections_per_ip", "max_connections_per_account", "max_line",
                "max_literal"):
        if getattr(config.imap, key) < 1:
            fail("imap", key, "must be at least 1")
    if config.imap.search_timeout <= 0:
        fail("imap", "search_timeout", "must be positive")
    if config.imap.max_line < 1000:
        fail("imap", "max_line", "RFC 7162 asks for at least 8192; 1000 is the floor here")
    if config.database.pool_size < 1 or config.database.batch_max < 1:
        fail("database", "pool_size" if config.database.pool_size < 1 else "batch_max",
             "must be at least 1")
    if not 4 <= config.auth.bcrypt_rounds <= 31:
        fail("auth", "bcrypt_rounds", "must be between 4 and 31")
    for key in ("max_failures", "max_logins_in_flight", "password_threads"):
        if getattr(config.auth, key) < 1:
            fail("auth", key, "must be at least 1")
    if config.auth.cool_off <= 0:
        fail("auth", "cool_off", "must be positive")
    for key in ("handshake_timeout", "write_stall_timeout"):
        if getattr(config.limits, key) <= 0:
            fail("limits", key, "must be positive")
    _validate_delivery(config, fail)


def _validate_delivery(config: Config, fail: Any) -> None:
    delivery = config.delivery
    for key in ("retry_schedule", "expire_after"):
        try:
            values = [parse_duration(part) for part in getattr(delivery, key).split()]
        except ValueError as exc:
            fail("delivery", key, str(exc))
        if not values or min(values) <= 0:
            fail("delivery", key, "needs positive durations")
    if len(delivery.expire_after.split()) != 1:
        fail("delivery", "expire_after", "one duration, e.g. 5d")
    if not 1 <= delivery.port <= 65535:
        fail("delivery", "port", "must be a TCP port")
    for key in ("max_connections", "max_connections_per_domain", "max_messages_per_connection",
                "claim_batch"):
        if getattr(delivery, key) < 1:
            fail("delivery", key, "must be at least 1")
    for key in ("poll_interval", "connect_timeout", "command_timeout", "claim_timeout"):
        if getattr(delivery, key) <= 0:
            fail("delivery", key, "must be positive")
    if delivery.claim_timeout < delivery.command_timeout * 2:
        fail("delivery", "claim_timeout", "must be at least twice delivery.command_timeout")
    if config.relay.tls not in ("none", "starttls", "implicit"):
        fail("relay", "tls", "must be none, starttls or implicit")
    if not 1 <= config.relay.port <= 65535:
        fail("relay", "port", "must be a TCP port")
    if bool(config.relay.username) != bool(config.relay.password):
        fail("relay", "username", "relay.username and relay.password go together")
    if config.relay.username and config.relay.tls == "none" and config.relay.host not in (
            "127.0.0.1", "::1", "localhost"):
        fail("relay", "tls", "credentials are only sent over TLS (or to a loopback relay)")
    if not 1024 <= config.dkim.rsa_bits <= 4096:
        fail("dkim", "rsa_bits", "must be between 1024 and 4096")
