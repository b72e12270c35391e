"""The collector's configuration: a TOML file validated by pydantic, overridden by CLI flags.

Every section and key has a default, so an empty (or absent) file is a valid config.
Errors name the file and the dotted key at fault: ``collector.toml: retention.max_runs: ...``.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gradwatch.collector.detectors import DetectorsConfig
from gradwatch.protocol import AlertKind

_NO_FILE = "(no config file)"


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerConfig(_Section):
    host: str = Field("127.0.0.1", description="interface to bind; loopback unless you mean it")
    port: int = Field(8765, ge=0, le=65535, description="websocket ingest port (0 = any free port)")
    http_port: int = Field(9108, ge=0, le=65535, description="HTTP port for /metrics and /api (0 = any free port)")
    data_dir: Path = Field(Path("gradwatch-data"), description="alert history and run state (SQLite)")
    token: str | None = Field(
        None, min_length=1, description="shared secret probes send as `Authorization: Bearer TOKEN`"
    )
    tls_cert: Path | None = Field(None, description="PEM certificate: serve wss:// instead of ws://")
    tls_key: Path | None = Field(None, description="PEM private key for tls_cert")
    max_frame_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="largest websocket frame accepted")
    max_messages_per_second: float = Field(
        1000.0, gt=0, description="per connection; bursts of twice this are allowed"
    )

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        return self


class RetentionConfig(_Section):
    history_steps: int = Field(
        1024, ge=1, le=1_000_000, description="merged steps kept per run in memory (ring buffer)"
    )
    finished_grace_seconds: float = Field(
        300.0, ge=0, description="how long an ended run's series stay on /metrics"
    )
    max_runs: int = Field(
        1000, ge=1, description="runs kept in memory; beyond it the oldest ended run is evicted"
    )
    heartbeat_timeout: float = Field(
        60.0, gt=0, description="seconds of silence before a rank is lost (a run: all its ranks)"
    )
    rank_wait_seconds: float = Field(
        10.0, ge=0, description="how long a step waits for a rank that has not reported it; then it is merged without"
    )


class MetricsConfig(_Section):
    layer_cap: int = Field(200, ge=0, description="per-layer series exported per run; the rest are counted")


class _ActionPolicyBase(_Section):
    cooldown: int = Field(200, ge=0, description="steps during which this action is not sent again")


class ReduceLR(_ActionPolicyBase):
    action: Literal["reduce_lr"]
    factor: float = Field(0.5, gt=0, lt=1)
    min_lr: float = Field(1e-6, ge=0)


class SkipStep(_Section):
    """Arms the probe's local guard: it skips the optimizer step itself when the alert's
    condition shows in that step's gradients, without waiting for a round trip."""

    action: Literal["skip_step"]


class Checkpoint(_ActionPolicyBase):
    action: Literal["checkpoint"]


class Stop(_ActionPolicyBase):
    action: Literal["stop"]

    @model_validator(mode="before")
    @classmethod
    def _no_mode(cls, data: Any) -> Any:
        # How training stops is the training side's choice: the loop that checks
        # run.should_stop, or not, is written there.
        if isinstance(data, dict) and "mode" in data:
            raise ValueError("`mode` is not a collector setting: how training stops is chosen where it runs, "
                             "gradwatch.attach(..., stop='raise' | 'flag'); remove `mode` here")
        return data


ActionPolicy = Annotated[ReduceLR | SkipStep | Checkpoint | Stop, Field(discriminator="action")]
# Parameters that stay in the collector; everything else in a policy travels in Action.params.
_COLLECTOR_SIDE_FIELDS = frozenset({"action", "cooldown"})


def action_params(policy: ReduceLR | SkipStep | Checkpoint | Stop) -> dict[str, float | str | bool]:
    return {k: v for k, v in policy.model_dump().items() if k not in _COLLECTOR_SIDE_FIELDS}


class CollectorConfig(_Section):
    server: ServerConfig = ServerConfig()
    retention: RetentionConfig = RetentionConfig()
    metrics: MetricsConfig = MetricsConfig()
    detectors: DetectorsConfig = Field(default_factory=DetectorsConfig)
    # `[actions.plateau]` is one policy; `[[actions.amp_scale_collapse]]` tables give several,
    # applied in order (for example checkpoint, then stop).
    actions: dict[AlertKind, list[ActionPolicy]] = {}

    @model_validator(mode="before")
    @classmethod
    def _one_policy_is_a_list_of_one(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("actions"), dict):
            data = dict(data)
            data["actions"] = {
                kind: [policy] if isinstance(policy, dict) else policy
                for kind, policy in data["actions"].items()
            }
        return data


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors(include_url=False):
        # List indexes ([[actions.x]] tables) and pydantic's "[key]" marker say nothing a
        # reader of the file would recognise: leave them out of the dotted key.
        loc = [str(p) for p in e["loc"] if not isinstance(p, int) and p != "[key]"]
        if e["type"] == "union_tag_invalid" or e["type"] == "union_tag_not_found":
            loc.append("action")
        key = ".".join(loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'")
        elif e["loc"][:1] == ("actions",) and e["loc"][-1:] == ("[key]",):
            lines.append(f"{source}: actions: unknown alert kind '{e['loc'][1]}': {e['msg']}")
        else:
            lines.append(f"{source}: {key}: {e['msg']}")
    return "\n".join(lines)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    section, _, key = dotted.partition(".")
    target = data.setdefault(section, {})
    if not isinstance(target, dict):
        raise ConfigError(f"[{section}] must be a table")
    target[key] = value


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> CollectorConfig:
    """Read `path` (TOML; None = defaults), then apply GRADWATCH_TOKEN from `environ`, then
    `overrides` ({"server.port": 0, ...}, from CLI flags; None values are ignored)."""
    environ = os.environ if environ is None else environ
    source = str(path) if path is not None else _NO_FILE
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as err:
            raise ConfigError(f"cannot read config file {source}: {err.strerror or err}") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{source}: not valid TOML: {err}") from None
    if environ.get("GRADWATCH_TOKEN"):
        _set_dotted(data, "server.token", environ["GRADWATCH_TOKEN"])
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, dotted, value)
    try:
        return CollectorConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None
