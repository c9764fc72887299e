"""Reading YAML config files with errors that name the key and the problem.

Invariants: a config file is read through one loader that refuses duplicate keys, files over
MAX_CONFIG_BYTES and nesting it cannot represent; every value a getter returns is bounded
(durations by tessera.durations, paths without NUL and at most PATH_MAX); a secret is taken
only from a file that is a regular file, not a link, owned by this user or root and private
to its owner (read_secret_file, Section.secret), or from stdin.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from tessera import safefs
from tessera.durations import MAX_DURATION, format_duration, parse_duration
from tessera.errors import ConfigError, InvalidArgument

MAX_CONFIG_BYTES = 1 << 20  # a config or policy file larger than this is a mistake, not a config
MAX_SECRET_BYTES = 4096
PATH_MAX = 4096


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, refusing a mapping that names a key twice (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: the base constructor says so
                    continue
                if first is not key_node:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"duplicate key {key!r} (first at line {first.start_mark.line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, source: str) -> Any:
    """YAML text as Python data through the one loader; ConfigError naming `source` and the position."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{source}: malformed YAML{where}: {getattr(e, 'problem', None) or e}") from None
    except RecursionError:
        raise ConfigError(f"{source}: malformed YAML: nested too deeply") from None


def check_path_text(value: str) -> str:
    """A path as text: ValueError unless it is without NUL and at most PATH_MAX bytes (what the kernel takes)."""
    if "\0" in value:
        raise ValueError("must not contain a NUL character")
    if len(os.fsencode(value)) > PATH_MAX:
        raise ValueError(f"is longer than {PATH_MAX} bytes")
    return value


LOG_LEVELS = ("debug", "info", "warning", "error")
_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)", re.ASCII)


def log_level(value: str) -> str:
    """A log level name; ValueError listing the known ones."""
    if value.lower() not in LOG_LEVELS:
        raise ValueError(f"unknown log level {value[:40]!r}: use one of {', '.join(LOG_LEVELS)}")
    return value.lower()


def dns_name(value: str) -> str:
    """A DNS host name (LDH labels, at most 253 characters), lower-cased; ValueError otherwise."""
    name = value.lower()
    if len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError(f"{value[:80]!r} is not a DNS name (letters, digits and '-' in dot-separated labels)")
    return name


def check_private_file(path: Path | str, st: os.stat_result, what: str) -> None:
    """A file that holds a secret: the rules of a key file in tessera.safefs (regular, owned by this
    user or root, no access for group or others)."""
    problem = safefs.file_problem(st, os.geteuid(), key=True)
    if problem:
        raise ConfigError(f"{what}: {path} {problem}")


def read_secret_file(path: Path | str, what: str) -> str:
    """The secret in a file (one line, surrounding whitespace dropped), read as tessera.safefs reads a
    key file: no link followed on the way or at the name, a FIFO refused rather than waited on."""
    try:
        check_path_text(str(path))
    except ValueError as e:
        raise ConfigError(f"{what}: {str(path)[:80]!r} {e}") from None
    try:
        data = safefs.read_regular(path, what, key=True, limit=MAX_SECRET_BYTES)
    except ConfigError:
        raise
    except OSError as e:
        raise ConfigError(f"{what}: cannot read {path}: {e.strerror}") from None
    return _secret_text(data, f"{what}: {path}")


def read_secret_stdin(what: str) -> str:
    """The secret on standard input (its first line)."""
    data = sys.stdin.buffer.readline(MAX_SECRET_BYTES + 1)
    return _secret_text(data, f"{what}: standard input")


def _secret_text(data: bytes, where: str) -> str:
    if len(data) > MAX_SECRET_BYTES:
        raise ConfigError(f"{where}: longer than {MAX_SECRET_BYTES} bytes")
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not ASCII text") from None
    if not text or not text.isprintable() or any(c.isspace() for c in text):
        raise ConfigError(f"{where}: {'empty' if not text else 'not one word of printable characters'}")
    return text


_HOST = re.compile(r"[A-Za-z0-9._-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]", re.ASCII)


def split_address(value: str) -> tuple[str, int]:
    """HOST:PORT as (HOST, PORT); an IPv6 HOST keeps its brackets. ValueError if it is not HOST:PORT."""
    host, sep, port = value.rpartition(":")
    if (not sep or not _HOST.fullmatch(host) or not re.fullmatch(r"[0-9]{1,5}", port, re.ASCII)
            or not 0 <= int(port) <= 65535):
        raise ValueError(f"must be HOST:PORT, got {value[:300]!r}")
    return host, int(port)


def default_bootstrap_address(listen_address: str) -> str:
    """Where the issuer's bootstrap listener is unless configured: its listen port + 1 (port 0, any free
    port, stays 0). Issuer, sidecar and bench clients all derive it here."""
    host, port = split_address(listen_address)
    return f"{host}:{port + 1 if port else 0}"


class Section:
    """A mapping from the config file; every getter names `prefix.key` when it fails."""

    def __init__(self, data: dict, prefix: str = "", source: str = "config", file: os.stat_result | None = None):
        self._data = data
        self._prefix = prefix
        self._source = source
        self._file = file  # the config file as read (fstat), or None if it was read through a link
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

    def int(self, key: str, default: Any = ..., minimum: int = 0, maximum: int = 2**31 - 1) -> int:
        v = self.get(key, int, default)
        if v is not None and not minimum <= v <= maximum:
            raise self.fail(key, f"must be between {minimum} and {maximum}, got {v}")
        return v

    def duration(self, key: str, default: Any = ..., minimum: int = 1, maximum: int = MAX_DURATION) -> int:
        """Seconds, between `minimum` and `maximum` (a default is trusted)."""
        self._seen.add(key)
        if not self.has(key):
            if default is ...:
                raise self.fail(key, "is required")
            return default if isinstance(default, int) else parse_duration(default)
        try:
            seconds = parse_duration(self._data[key], maximum)
        except InvalidArgument as e:
            raise self.fail(key, e.message) from None
        if seconds < minimum:
            raise self.fail(key, f"must be at least {format_duration(minimum)}")
        return seconds

    def path(self, key: str, default: Any = ...) -> Path | None:
        v = self.str(key, default)
        if isinstance(v, str):
            self.checked(key, check_path_text, v)
            return Path(v)
        return v

    def secret(self, key: str) -> str | None:
        """A secret written in this file: only if the file itself is private (check_private_file) and not a link."""
        v = self.str(key, None)
        if v is None:
            return None
        if self._file is None:
            raise self.fail(key, f"{self._source} is a symbolic link or changed while read; a file holding a "
                                 "secret must be named itself")
        check_private_file(self._source, self._file, self._name(key))
        return _secret_text(v.encode("ascii", "replace"), f"{self._source}: {self._name(key)}")

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

    def addresses(self, key: str, default: Any = ...) -> tuple[str, ...]:
        """One HOST:PORT, or a non-empty list of them (no repeats), as a tuple."""
        self._seen.add(key)
        if not self.has(key):
            if default is ...:
                raise self.fail(key, "is required")
            return default
        raw = self._data[key]
        if isinstance(raw, str):
            return (self.address(key),)
        if not isinstance(raw, list):
            raise self.fail(key, f"must be HOST:PORT or a list of them, got {type(raw).__name__}")
        if not raw:
            raise self.fail(key, "must list at least one HOST:PORT")
        items = Section({f"{key}[{i}]": v for i, v in enumerate(raw)}, self._prefix, self._source, self._file)
        found = tuple(items.address(f"{key}[{i}]") for i in range(len(raw)))
        for i, a in enumerate(found):
            if a in found[:i]:
                raise self.fail(f"{key}[{i}]", f"{a} is listed twice")
        return found

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
        return Section(v, f"{self._name(key)}.", self._source, self._file)

    def reject_unknown(self) -> None:
        unknown = sorted(set(self._data) - self._seen, key=str)  # a key may be a number or null in YAML
        if unknown:
            raise self.fail(unknown[0], "unknown key")


def load_yaml(path: str | Path) -> Section:
    try:
        check_path_text(str(path))
    except ValueError as e:
        raise ConfigError(f"config file {str(path)[:80]!r} {e}") from None
    p = Path(path)
    try:
        # Without blocking: a FIFO at this path is refused below, not waited on.
        with os.fdopen(os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"{p}: cannot read config file: not a regular file")
            raw = f.read(MAX_CONFIG_BYTES + 1)
        # Read through a link, or replaced meanwhile: not the file at this path, so no secret may come from it.
        lst = os.lstat(p)
        same = not stat.S_ISLNK(lst.st_mode) and (lst.st_dev, lst.st_ino) == (st.st_dev, st.st_ino)
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file: {e.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: config file is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: config file is not UTF-8 (byte {e.start})") from None
    data = parse_yaml(text, str(p))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the config file must be a YAML mapping of keys to values")
    return Section(data, "", str(p), st if same else None)
