"""Command-line flags made from the flows' pydantic configs: one flag per field, with its type,
choices, description and default, so a new config field appears in the CLI, the Prefect UI
form and the deployment parameters at once."""

from __future__ import annotations

import argparse
import types
import typing

from pydantic import BaseModel, ValidationError

from darkroom.config import TrainConfig

# Fields of a nested config that the CLI shows at the top level (--epochs, not --train-epochs).
NESTED = {"train": TrainConfig}
GATE_FIELDS = (
    "metric",
    "min_delta",
    "max_class_recall_drop",
    "min_metric",
    "baseline_margin",
    "max_p_value",
    "tta",
)


def _flag_type(annotation) -> dict:
    """argparse keywords for a field's type: bools get --x/--no-x, Literals get choices."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(kinds) > 1:  # a count or "auto", say: the config's validation tells them apart
            return {"type": str}
        annotation = kinds[0]
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(annotation) is typing.Literal:
        choices = typing.get_args(annotation)
        return {"choices": choices, "type": type(choices[0])}
    return {"type": annotation}


def add_config_flags(p: argparse.ArgumentParser, model: type[BaseModel], only=None) -> None:
    """One flag per field of ``model`` (nested configs flattened), with its type, choices,
    description and default. A flag left out leaves the field to the config file or its
    default, so only what was typed overrides."""
    for name, field in model.model_fields.items():
        if name in NESTED:
            add_config_flags(p, NESTED[name], only)
            continue
        if only is not None and name not in only:
            continue
        default = field.get_default(call_default_factory=True)
        text = field.description or ""
        text = text[:-1] if text.endswith(".") and not text.endswith("..") else text
        text += "" if default is None else f" (default: {default})"
        p.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            default=argparse.SUPPRESS,
            help=text.lstrip(),
            **_flag_type(field.annotation),
        )


def read_config_file(path: str | None) -> dict:
    """A YAML or TOML file with the fields of the flow's config (as in the deployment's
    parameters: ``train`` nested)."""
    if not path:
        return {}
    import tomllib

    import yaml

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f) if path.endswith(".toml") else yaml.safe_load(f)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"cannot parse {path}: {' '.join(str(e).split())}") from None
    if not isinstance(data or {}, dict):
        raise ValueError(f"{path} must hold a mapping of config fields, not {type(data).__name__}")
    return data or {}


def config_from_args(model: type[BaseModel], a: argparse.Namespace, **extra):
    """``model`` from the config file, overridden by the flags that were given."""
    data = {**read_config_file(getattr(a, "config", None)), **extra}
    given = vars(a)
    for name in model.model_fields:
        if name in NESTED:
            nested = dict(data.get(name) or {})
            nested.update({k: given[k] for k in NESTED[name].model_fields if k in given})
            if "pretrained_file" in given and "pretrained" not in given:
                nested["pretrained"] = True  # a weights file is a request for pretraining
            data[name] = nested
        elif name in given:
            data[name] = given[name]
    return model.model_validate(data)


def explain(error: ValidationError) -> str:
    """A config validation error on one line: which field, and what is wrong with it."""
    parts = []
    for e in error.errors():
        where = ".".join(str(x) for x in e["loc"]) or "config"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown config field {where!r} (--help lists the fields)")
        else:
            parts.append(f"{where}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(parts)
