"""Building a :class:`~wmss_ray.config.schema.WMSSConfig`: YAML file, dotted overrides, clear errors.

A config is built from (in order): the schema defaults, an optional YAML file, then dotted
overrides (``--set mix.lam=0.45``). Unknown keys are rejected with a did-you-mean suggestion
before pydantic validates (a key that was renamed or removed names its replacement,
``schema.RENAMED_KEYS``); validation errors name the key, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from wmss_ray.config.schema import RENAMED_KEYS, ConfigError, WMSSConfig


def _known_keys(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _check_unknown(data: Any, model: type[BaseModel], prefix: str, source: str) -> None:
    """Reject unknown keys with a did-you-mean, before pydantic's less helpful message."""
    if not isinstance(data, dict):
        return
    known = _known_keys(model)
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in known and path in RENAMED_KEYS:
            new, why = RENAMED_KEYS[path]
            raise ConfigError(f"{source}: unknown key '{path}' (removed); did you mean '{new}'? {why}")
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; allowed: {', '.join(known)}"
            raise ConfigError(f"{source}: unknown key '{path}'{hint}")
        field = model.model_fields.get(key) or next(
            f for f in model.model_fields.values() if f.alias == key
        )
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            _check_unknown(value, sub, f"{path}.", source)


def _format_validation_error(err: ValidationError, source: str, data: dict[str, Any]) -> str:
    lines = [f"{source}: invalid config"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        value: Any = data
        for p in e["loc"]:
            value = value.get(p, "<missing>") if isinstance(value, dict) else "<missing>"
        msg = e["msg"].removeprefix("Value error, ")
        shown = f" = {value!r}" if loc and value != "<missing>" else ""
        lines.append(f"  {loc or '<root>'}{shown}: {msg}")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``'mix.lam=0.45'`` -> (['mix', 'lam'], 0.45); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.path=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override '{item}' has an empty key")
    return parts, yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    for item in overrides or []:
        parts, value = parse_override(item)
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{p}' is not a section")
        node[parts[-1]] = value
    return data


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None, source: str = "<dict>") -> WMSSConfig:
    data = apply_overrides(json.loads(json.dumps(data or {})), overrides)
    _check_unknown(data, WMSSConfig, "", source)
    try:
        return WMSSConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source, data)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> WMSSConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply dotted overrides."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    return config_from_dict(data, overrides, source)


def save_config(cfg: WMSSConfig, path: str | Path) -> None:
    """Write ``cfg`` as YAML to a local path or a storage URI."""
    from wmss_ray.io.storage import write_text

    write_text(str(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def model_dir_keys(cfg: WMSSConfig) -> dict[str, str]:
    """``{config key: path}`` of every model directory ``cfg`` reads (``models.base`` only outside
    the demo world, where phase 0 makes M0)."""
    m = cfg.models
    keys = {"models.base": None if m.demo else m.base, "models.strong": m.strong, "models.weak": m.weak}
    return {k: v for k, v in keys.items() if v}


def check_model_dir(path: str, key: str) -> None:
    """Raise :class:`ConfigError` (one line naming ``key`` and ``path``) unless ``path`` is a
    directory, local or in object storage, with a readable ``config.json``.

    Without this a missing directory surfaces deep inside transformers (``OSError: Repo id must
    be in the form ...``: a path that is not a directory is taken for a hub id) or in a Ray actor.
    """
    from wmss_ray.io import storage

    where, config = storage.redact(path), storage.join(path, "config.json")
    try:
        found = storage.exists(path), storage.exists(config)
        if all(found):
            storage.read_text(config)
    except (OSError, ValueError) as err:  # permissions, an unreachable store, undecodable bytes
        raise ConfigError(f"{key}: cannot read {where}/config.json: {type(err).__name__}: {err}") from None
    if not found[0]:
        raise ConfigError(f"{key}: model directory {where} does not exist")
    if not found[1]:
        raise ConfigError(f"{key}: {where} has no config.json (not a Hugging Face model directory)")


def check_model_dirs(cfg: WMSSConfig) -> None:
    """:func:`check_model_dir` for every model directory ``cfg`` names (``wmss run`` and ``wmss
    plan`` call it before anything else happens)."""
    for key, path in model_dir_keys(cfg).items():
        check_model_dir(path, key)


def corpus_keys(cfg: WMSSConfig) -> dict[str, str]:
    """``{config key: path}`` of every corpus ``cfg`` reads (none in the demo world: it writes its own)."""
    if cfg.models.demo:
        return {}
    d = cfg.data
    return {k: v for k, v in {"data.train": d.train, "data.validation": d.validation, "data.eval": d.eval}.items() if v}


def check_corpus_paths(cfg: WMSSConfig) -> None:
    """Raise :class:`ConfigError` (one line naming the key and the path) for a corpus path that
    does not exist or cannot be read, before Ray starts (else it surfaces inside a Ray Data task)."""
    from wmss_ray.io import storage

    for key, path in corpus_keys(cfg).items():
        where = storage.redact(path)
        try:
            found = storage.exists(path)
        except (OSError, ValueError) as err:
            raise ConfigError(f"{key}: cannot read corpus {where}: {type(err).__name__}: {err}") from None
        if not found:
            raise ConfigError(f"{key}: corpus {where} does not exist; point {key} at a .jsonl(.gz) or "
                              ".parquet file, a folder of them, or an HF save_to_disk directory")


#: Files of which a Hugging Face tokenizer directory holds at least one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_tokenizer_dir(cfg: WMSSConfig) -> None:
    """Raise :class:`ConfigError` when the model directory the corpus is tokenised with (the
    first of ``models.base``, ``models.strong``) has no tokenizer files; the demo makes its own."""
    from wmss_ray.io import storage

    m = cfg.models
    key, path = ("models.base", m.base) if m.base else ("models.strong", m.strong)
    if m.demo or not path:
        return
    if not any(storage.exists(storage.join(path, f)) for f in TOKENIZER_FILES):
        raise ConfigError(f"{key}: {storage.redact(path)} has no tokenizer ({', '.join(TOKENIZER_FILES)}); "
                          "save the tokenizer into the model directory (tokenizer.save_pretrained(dir))")
