"""MkDocs hook: pages that are generated from the code and the committed results, so they
cannot drift.

- ``<!-- options: RetrainConfig -->`` becomes a table of every field of that pydantic model in
  ``darkroom.config`` (name, type, default, description). A field whose type is another model
  (``RetrainConfig.train``) points at that model's own table.
- ``<!-- bench: latest -->`` becomes a table of the ratios of the newest JSON file in
  ``benchmarks/results/`` (by its ``date``), with their targets.

Registered under ``hooks:`` in mkdocs.yml.
"""

from __future__ import annotations

import html
import json
import re
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
OPTIONS = re.compile(r"<!--\s*options:\s*(\w+)\s*-->")
BENCH = re.compile(r"<!--\s*bench:\s*latest\s*-->")


def _cell(text: str) -> str:
    """Text made safe for one Markdown table cell; ``code`` in it becomes <code>."""
    parts = " ".join(str(text).split()).replace("``", "`").split("`")
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(_code(part))
        else:
            out.append(html.escape(part, quote=False).replace("|", "\\|").replace("*", "\\*"))
    return "".join(out)


def _code(text: str) -> str:
    return f"<code>{html.escape(str(text), quote=False)}</code>"


def _type(annotation) -> str:
    """A readable name for a field's type: ``int``, ``str or None``, ``"soft", "none"``."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _type(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        return ", ".join(repr(a).replace("'", '"') for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _bounds(field) -> str:
    signs = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    out = []
    for meta in field.metadata:
        for attr, sign in signs.items():
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{sign} {value!r}")
    return ", ".join(out)


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return f"{type(value).__name__}()"
        return repr(value)
    if field.default is PydanticUndefined:
        return "(required)"
    return repr(field.default)


def _nested_model(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def options_table(model: type[BaseModel]) -> str:
    """One Markdown table row per field of ``model``, in declaration order (inherited first)."""
    rows = [
        f"`{model.__module__}.{model.__name__}`: {_cell(model.__doc__ or '')}",
        "",
        "| field | type | default | description |",
        "| --- | --- | --- | --- |",
    ]
    for name, field in model.model_fields.items():
        kind = _type(field.annotation)
        bounds = _bounds(field)
        kind = f"{kind} ({bounds})" if bounds else kind
        description = field.description or ""
        nested = _nested_model(field.annotation)
        if nested is not None:
            description += f" Its fields: the {nested.__name__} table."
        rows.append(
            f"| {_code(name)} | {_cell(kind)} | {_code(_default(field))} | {_cell(description)} |"
        )
    return "\n".join(rows) + "\n"


def _options(match: re.Match) -> str:
    from darkroom import config

    model = getattr(config, match.group(1), None)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise ValueError(f"docs: {match.group(1)} is not a pydantic model of darkroom.config")
    return options_table(model)


def latest_results(folder: Path = RESULTS) -> tuple[Path, dict]:
    """The newest committed benchmark run, by its recorded date."""
    runs = [(json.loads(p.read_text()), p) for p in sorted(folder.glob("*.json"))]
    if not runs:
        raise FileNotFoundError(f"docs: no benchmark results in {folder}")
    data, path = max(runs, key=lambda r: r[0].get("date", ""))
    return path, data


def bench_table(folder: Path = RESULTS) -> str:
    path, data = latest_results(folder)
    machine = data.get("machine", {})
    about = ", ".join(f"{k} {v}" for k, v in machine.items())
    rows = [
        f"From `{path.relative_to(ROOT).as_posix()}` ({data.get('date', 'no date')}; "
        f"{_cell(about)}; commit {data.get('commit', '?')}"
        f"{', quick run' if data.get('quick') else ''}).",
        "",
        "| key | value | target | met |",
        "| --- | --- | --- | --- |",
    ]
    targets = data.get("targets", {})
    for key, value in data.get("results", {}).items():
        target = targets.get(key, {})
        met = {True: "yes", False: "no"}.get(target.get("met"), "")
        shown = f"{value:.3g}" if isinstance(value, float) else str(value)
        rows.append(f"| {_code(key)} | {shown} | {_cell(target.get('want', ''))} | {met} |")
    return "\n".join(rows) + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:
    markdown = OPTIONS.sub(_options, markdown)
    if BENCH.search(markdown):
        markdown = BENCH.sub(lambda _: bench_table(), markdown)
    return markdown
