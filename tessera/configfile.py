"""Reading YAML config files with errors that name the key and the problem."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import yaml

from tessera.durations import parse_duration
from tessera.errors import ConfigError, InvalidArgument


def split_address(value: str) -> tuple[str, int]:
    """HOST:PORT as (HOST, PORT); an IPv6 HOST keeps its brackets. ValueError if it is not HOST:PORT."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"must be HOST:PORT, got {value!r}")
    return host, int(port)


def default_bootstrap_address(listen_address: str) -> str:
    """Where the issuer's bootstrap listener is unless configured: its listen port + 1 (port 0, any free
    port, stays 0). Issuer, sidecar and bench clients all derive it here."""
    host, port = split_address(listen_address)
    return f"{host}:{port + 1 if port else 0}"


class Section:
    """A mapping from the config file; every getter names `prefix.key` when it fails."""

    def __init__(self, data: dict, prefix: str = "", source: str = "config"):
        self._data = data
        self._prefix = prefix
        self._source = source
        self._seen: set[str] = set()

    def _name(self, key: str) -> str:
        return f"{self._prefix}{key}"

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self._source}: {self._name(key)}: {problem}")

    def has(self, key: str) -> bool:
        return key in self._data and self._data[key] is not None

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., required: bool = False) -> Any:
        self._seen.add(key)
        if not self.has(key):
            if required or default is ...:
                raise self.fail(key, "is required")
            return default
        value = self._data[key]
        if kind is int and isinstance(value, bool):
            raise self.fail(key, f"must be an integer, got {value!r}")
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind):
            name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.fail(key, f"must be {name}, got {type(value).__name__} {value!r}")
        return value

    def str(self, key: str, default: Any = ...) -> str:
        v = self.get(key, str, default)
        if v is not None and v is not default and not v.strip():
            raise self.fail(key, "must not be empty")
        return v

    def duration(self, key: str, default: Any = ...) -> int:
        self._seen.add(key)
        if not self.has(key):
            if default is ...:
                raise self.fail(key, "is required")
            return default if isinstance(default, int) else parse_duration(default)
        try:
            return parse_duration(self._data[key])
        except InvalidArgument as e:
            raise self.fail(key, e.message) from None

    def path(self, key: str, default: Any = ...) -> Path | None:
        v = self.str(key, default)
        return Path(v) if isinstance(v, str) else v

    def address(self, key: str, default: Any = ...) -> str:
        """HOST:PORT."""
        v = self.str(key, default)
        if v is None:
            return None
        try:
            split_address(v)
        except ValueError as e:
            raise self.fail(key, str(e)) from None
        return v

    def checked(self, key: str, fn: Callable[[Any], Any], raw: Any) -> Any:
        try:
            return fn(raw)
        except (InvalidArgument, ValueError) as e:
            raise self.fail(key, getattr(e, "message", str(e))) from None

    def section(self, key: str) -> "Section":
        self._seen.add(key)
        v = self._data.get(key) or {}
        if not isinstance(v, dict):
            raise self.fail(key, "must be a mapping")
        return Section(v, f"{self._name(key)}.", self._source)

    def reject_unknown(self) -> None:
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            raise self.fail(unknown[0], "unknown key")


def load_yaml(path: str | Path) -> Section:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{p}: malformed YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the config file must be a YAML mapping of keys to values")
    return Section(data, "", str(p))
