"""The settings as text carries them: command-line values, config.json, and comparing two runs' settings.

config.py defines the settings (one dataclass per concern, presets, the rules a run checks);
this module reads and writes them: `fields` lists every `--section.field`, `parse_value` and
`apply` set fields from command-line text, `to_dict`/`from_dict` are config.json, `problem`
says whether a stored dict is a config of this program, `differences` what two runs do not share.
"""
import dataclasses
import json

from minimal_amkp.config import CHOICES, Config, RunError


def fields():
    """(section, name, type of its default) for every setting, in declaration order."""
    cfg = Config()
    return [(s.name, f.name, type(getattr(getattr(cfg, s.name), f.name)))
            for s in dataclasses.fields(Config) for f in dataclasses.fields(getattr(cfg, s.name))]


def parse_value(section, name, kind, text):
    """CLI text -> a value of the field's type; RunError naming the option when it does not parse."""
    opt = f"--{name.replace('_', '-')}" if section == "run" else f"--{section}.{name}"
    try:
        if kind is bool:
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(text)
            value = text.lower() in ("1", "true", "yes")
        elif kind is tuple:
            value = tuple(int(v) for v in text.split(","))
        else:
            value = kind(text)
    except ValueError:
        raise RunError(f"{opt}: cannot read {text!r} as {kind.__name__}") from None
    allowed = CHOICES.get((section, name))
    if allowed and value not in allowed:
        raise RunError(f"{opt}: {text!r} is not one of {', '.join(allowed)}")
    return value


def to_dict(cfg):
    return dataclasses.asdict(cfg)


def from_dict(d):
    """Inverse of to_dict (config.json): lists back to tuples where the field holds a tuple."""
    cfg = Config()
    for section, name, kind in fields():
        if name in d.get(section, {}):
            value = d[section][name]
            setattr(getattr(cfg, section), name, tuple(value) if kind is tuple else value)
    return cfg


def apply(cfg, given):
    """Set cfg's fields from {"section.field": command-line text (or a bool flag)} -> cfg."""
    for key, text in given.items():
        section, name = key.split(".")
        kind = type(getattr(getattr(cfg, section), name))
        value = text if isinstance(text, bool) else parse_value(section, name, kind, text)
        setattr(getattr(cfg, section), name, value)
    return cfg


def as_json(d):
    """A to_dict as config.json reads back: tuples become lists."""
    return json.loads(json.dumps(d))


def differences(a, b, ignored=()):
    """["section.field: a's -> b's"] where two as_json configs differ, but for the `ignored` names."""
    return [f"{s}.{k}: {a[s][k]!r} -> {b[s].get(k)!r}" for s in a for k in a[s]
            if f"{s}.{k}" not in ignored and a[s][k] != b[s].get(k)]


def _kind_ok(value, default):
    if isinstance(default, bool) or isinstance(default, str):
        return type(value) is type(default)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def problem(stored):
    """None if `stored` (parsed JSON) has the sections, fields and kinds of values of a Config, else what is off."""
    want = as_json(to_dict(Config()))
    if not isinstance(stored, dict) or set(stored) != set(want):
        return f"its sections are {sorted(stored) if isinstance(stored, dict) else type(stored).__name__}"
    for section, defaults in want.items():
        if not isinstance(stored[section], dict):
            return f"{section} is {stored[section]!r}"
        for k, v in stored[section].items():
            if k not in defaults or not _kind_ok(v, defaults[k]):
                return f"{section}.{k} is {v!r}"
    return None
