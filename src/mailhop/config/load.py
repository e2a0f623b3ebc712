"""Read and validate the TOML file; turn every problem into a line naming the key and the fix."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..errors import ConfigError
from .schema import Config

__all__ = ["format_errors", "load_config"]


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "(top level)"


def format_errors(exc: ValidationError) -> list[str]:
    """One line per problem: ``key: what is wrong``."""
    lines = []
    for err in exc.errors():
        key = _dotted(tuple(err["loc"]))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key; check its spelling against docs/configuration.md"
        elif err["type"] == "missing":
            msg = "required key is missing"
        msg = msg.removeprefix("Value error, ")
        lines.append(f"{key}: {msg}")
    return lines


def _resolve_paths(config: Config, base: Path) -> Config:
    def absolute(p: Path | None) -> Path | None:
        return None if p is None else (p if p.is_absolute() else base / p)

    queue = config.queue.model_copy(update={"path": absolute(config.queue.path)})
    routes = [r.model_copy(update={"password_file": absolute(r.password_file)}) for r in config.route]
    listeners = [
        lc.model_copy(update={"certificate": absolute(lc.certificate), "key": absolute(lc.key)})
        for lc in config.listener
    ]
    tls = config.tls.model_copy(update={"certificate": absolute(config.tls.certificate), "key": absolute(config.tls.key)})
    sign = [s.model_copy(update={"key_file": absolute(s.key_file)}) for s in config.dkim.sign]
    dkim = config.dkim.model_copy(update={"sign": sign})
    return config.model_copy(update={"queue": queue, "tls": tls, "route": routes, "listener": listeners, "dkim": dkim})


def load_config(path: str | Path) -> Config:
    """Load, validate and resolve relative paths against the file's directory; raise ConfigError listing every problem."""
    path = Path(path)
    try:
        raw: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found; pass --config with the path of your mailhop.toml") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError("\n".join(f"{path}: {line}" for line in format_errors(exc))) from None
    config = _resolve_paths(config, path.resolve().parent)
    problems = []
    for name in ("certificate", "key"):
        file = getattr(config.tls, name)
        if file is not None and not file.is_file():
            problems.append(f"{path}: tls.{name}: file {file} does not exist; make one with a CA or a self-signed pair")
    for i, lc in enumerate(config.listener):
        for name in ("certificate", "key"):
            file = getattr(lc, name)
            if file is not None and not file.is_file():
                problems.append(f"{path}: listener[{i}].{name}: file {file} does not exist")
    for i, entry in enumerate(config.dkim.sign):
        if not entry.key_file.is_file():
            problems.append(f"{path}: dkim.sign[{i}].key_file: file {entry.key_file} does not exist; make one with "
                            f"`mailhop dkim keygen --domain {entry.domain} --selector {entry.selector}`")
    for i, route in enumerate(config.route):
        if route.password_file is not None and not route.password_file.is_file():
            problems.append(f"{path}: route[{i}].password_file: file {route.password_file} does not exist")
    if problems:
        raise ConfigError("\n".join(problems))
    return config
