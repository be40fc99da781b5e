"""One loader for every run config: a recipe, then a TOML or JSON file, then command-line
overrides, into frozen dataclasses (one per section), each checked by `minigpt.typed`.

A kind of run names its sections (pretraining: model, train, data, sample; fine-tuning's
training settings: train) as `Section`s, and every step below is the same for all:

- `read_config_file`: a TOML or JSON file as a dict of sections;
- `merge_file`: a file's sections over the recipe's; unknown sections and keys, and keys
  written outside any section, are errors that list the valid ones;
- `apply_override`: one 'section.key=value' or 'key=value' (when the key names one field
  in one section); the text is converted by the field's type (`minigpt.typed.parse_cli`);
- `build_sections`: each section's dataclass, its values checked against their types;
  errors name where the offending value came from (the recipe, the file, the flag).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minigpt.config import reject_unknown_keys
from minigpt.files import existing_file, read_json, read_toml
from minigpt.typed import check_value, field_types, parse_cli

Origins = dict[tuple[str, str], str]
"""(section, key) -> where its value came from ('recipe ...', a file, a flag), for errors."""


@dataclass(frozen=True)
class Section:
    """One section of a run config: its dataclass and what it accepts beside the fields."""

    cls: type
    """The frozen dataclass the section's values build."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys accepted beside the fields, with their types (the model section's `preset`)."""
    build: Callable[[dict[str, Any]], Any] | None = None
    """Builds the dataclass from the checked values (extra keys included); None: cls(**values)."""
    required: tuple[str, ...] = ()
    """Keys that must be set (by the recipe, the file or an override)."""
    restart_key: str | None = None
    """A key that, set in a file, starts the section afresh (a new model preset replaces the recipe's model)."""

    def types(self) -> dict[str, Any]:
        """Key -> declared type."""
        return {**field_types(self.cls), **self.extra}


Sections = Mapping[str, Section]


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A TOML (Python >= 3.11) or JSON config file as a dict of sections.

    Raises FileNotFoundError when it is absent and ValueError (naming the file, and the
    line for syntax errors) when it cannot be read.
    """
    path = existing_file(path, "config file")
    if path.suffix.lower() == ".toml":
        return read_toml(path, "config file")
    if path.suffix.lower() == ".json":
        return read_json(path, "config file")
    raise ValueError(f"config file {path} must end in .toml or .json")


def merge_file(sections: Sections, values: dict[str, dict[str, Any]], file_values: dict[str, Any],
               file: str | Path, origins: Origins) -> None:
    """Put a config file's sections over `values` (in place), checking every section and key."""
    for section, given in file_values.items():
        if section not in sections:
            owners = [s for s in sections if section in sections[s].types()]
            if owners and not isinstance(given, dict):  # `lr = 1e-3` written above every [section]
                raise ValueError(f"config file {file}: {section!r} is at the top level, outside any section; put it "
                                 f"under [{owners[0]}]" + (f" (or [{'] or ['.join(owners[1:])}])" if owners[1:] else ""))
            raise ValueError(f"config file {file}: unknown section {section!r}; valid sections are: "
                             f"{', '.join(sections)}")
        if not isinstance(given, dict):
            raise ValueError(f"config file {file}: section {section!r} must be a table of key = value pairs "
                             f"(in TOML: [{section}] followed by key = value lines), not {given!r}")
        spec = sections[section]
        try:
            reject_unknown_keys(spec.cls, {k: v for k, v in given.items() if k not in spec.extra})
        except ValueError as err:
            raise ValueError(f"config file {file}: [{section}] {err}") from None
        if spec.restart_key is not None and spec.restart_key in given:
            values[section] = {}
        values.setdefault(section, {}).update(given)
        origins.update({(section, key): str(Path(file)) for key in given})


def apply_override(sections: Sections, values: dict[str, dict[str, Any]], item: str,
                   origins: Origins | None = None) -> None:
    """Apply one 'section.key=value' or 'key=value' to `values` (leading dashes and '-' in
    keys allowed). The text is converted by the key's declared type; a bare `--flag` means
    true and is only allowed for booleans."""
    item = item.lstrip("-")
    key, sep, text = item.partition("=")
    key = key.replace("-", "_")
    if "." in key:
        section, name = key.split(".", 1)
        if section not in sections:
            raise ValueError(f"override {item!r}: unknown section {section!r}; sections are {', '.join(sections)}")
        if name not in sections[section].types():
            raise ValueError(f"override {item!r}: {section} has no key {name!r}; valid keys are: "
                             f"{', '.join(sorted(sections[section].types()))}")
    else:
        owners = [s for s in sections if key in sections[s].types()]
        if not owners and len(sections) == 1:  # one section: say which dataclass lacks the key
            reject_unknown_keys(next(iter(sections.values())).cls, {key: text})
        if not owners:
            raise ValueError(f"override {item!r}: no section has a key {key!r}. Valid keys are {valid_keys(sections)}")
        if len(owners) > 1:
            raise ValueError(f"override {item!r}: {key!r} is in several sections; write "
                             + " or ".join(f"--{s}.{key}=..." for s in owners))
        section, name = owners[0], key
    flag = f"--{section}.{name}"
    tp = sections[section].types()[name]
    if sep:
        parsed = parse_cli(text, tp, flag)
    elif tp is bool:
        parsed = True  # a bare --flag means true
    else:
        raise ValueError(f"{flag} needs a value, e.g. {flag}=... (only true/false keys may be given bare)")
    values.setdefault(section, {})[name] = parsed
    if origins is not None:
        origins[(section, name)] = flag


def valid_keys(sections: Sections) -> str:
    """'model: bias, block_size, ...; train: ...': every key of every section, for errors."""
    return "; ".join(f"{s}: {', '.join(sorted(sections[s].types()))}" for s in sections)


def apply_overrides(sections: Sections, values: dict[str, dict[str, Any]], items: Iterable[str],
                    origins: Origins | None = None) -> dict[str, dict[str, Any]]:
    """`apply_override` for each item in turn; returns `values`."""
    for item in items:
        apply_override(sections, values, item, origins)
    return values


def _syntax(origin: str | None) -> str:
    origin = (origin or "").lower()
    return "toml" if origin.endswith(".toml") else "json" if origin.endswith(".json") else "python"


def _build_section(name: str, spec: Section, values: Any, origins: Origins) -> Any:
    """One section's dataclass; errors name where the offending value came from."""
    if not isinstance(values, dict):
        raise ValueError(f"[{name}] must be a table of key = value pairs; got {values!r}")
    reject_unknown_keys(spec.cls, {k: v for k, v in values.items() if k not in spec.extra})
    types = spec.types()
    checked = {}
    for key, value in values.items():
        origin = origins.get((name, key))
        try:
            checked[key] = check_value(value, types[key], key, owner=name, syntax=_syntax(origin))
        except ValueError as err:
            raise ValueError(f"{err} (from {origin})" if origin else str(err)) from None
    try:
        return spec.build(checked) if spec.build is not None else spec.cls(**checked)
    except ValueError as err:
        named = re.match(r"(\w+)=", str(err))
        origin = origins.get((name, named.group(1))) if named else None
        raise ValueError(f"[{name}] {err}{f' (from {origin})' if origin else ''}") from None


def build_sections(sections: Sections, values: dict[str, Any], origins: Origins | None = None) -> dict[str, Any]:
    """Section name -> its validated dataclass, built from a dict of sections."""
    origins = origins or {}
    unknown = sorted(set(values) - set(sections))
    if unknown:
        raise ValueError(f"unknown config sections {unknown}; valid sections are: {', '.join(sections)}")
    for name, spec in sections.items():
        given = values.get(name) or {}
        for key in spec.required:
            if key not in given:
                raise ValueError(f"{name}.{key} is required (set it in the config file or with --{name}.{key}=...)")
    return {name: _build_section(name, spec, dict(values.get(name) or {}), origins) for name, spec in sections.items()}


def load_sections(sections: Sections, recipe: dict[str, dict[str, Any]], recipe_name: str,
                  file_values: dict[str, Any] | None = None, file: str | Path | None = None,
                  overrides: Iterable[str] = ()) -> dict[str, Any]:
    """The one loader: `recipe`, then a file's sections, then `overrides`, built and validated."""
    origins: Origins = {}
    values = {section: dict(given) for section, given in recipe.items()}
    for section, given in values.items():
        origins.update({(section, key): f"recipe {recipe_name!r}" for key in given})
    if file_values:
        merge_file(sections, values, file_values, file, origins)
    apply_overrides(sections, values, overrides, origins)
    return build_sections(sections, values, origins)
