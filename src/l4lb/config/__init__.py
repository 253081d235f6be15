"""Configuration: a TOML file -> a validated, immutable :class:`Config` (errors name the key)."""

from l4lb.config.issues import ConfigError, ConfigIssue, Severity
from l4lb.config.loader import load_config, parse_config
from l4lb.config.schema import (
    AdminConfig,
    BackendConfig,
    Config,
    HealthConfig,
    ListenerConfig,
    LogConfig,
    PoolConfig,
)

__all__ = [
    "AdminConfig",
    "BackendConfig",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "HealthConfig",
    "ListenerConfig",
    "LogConfig",
    "PoolConfig",
    "Severity",
    "load_config",
    "parse_config",
]
