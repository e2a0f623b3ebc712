"""Configuration: one TOML file, validated by one pydantic schema at start-up."""

from .load import format_errors, load_config
from .schema import Config, LimitsConfig, ListenerConfig, QueueConfig, RelayConfig, TlsConfig

__all__ = [
    "Config",
    "LimitsConfig",
    "ListenerConfig",
    "QueueConfig",
    "RelayConfig",
    "TlsConfig",
    "format_errors",
    "load_config",
]
