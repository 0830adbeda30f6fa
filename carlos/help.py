"""`carlos <command> --help`: the command's flags with their meaning and default, and the config groups
that command accepts. The defaults come from the composed config and the meanings from the comments in
conf/*.yaml, so the help says what the YAML says; nothing here imports torch or Lightning, so it is quick.
"""

from __future__ import annotations

import re
from pathlib import Path

from carlos.compose import compose, conf_dir, group_options
from carlos.config import config_keys

LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w.]*):(?P<value>[^#]*?)(?:\s+#\s*(?P<comment>.*))?$")


def yaml_comments(path: Path, prefix: str = "") -> dict[str, str]:
    """{dotted key: its end-of-line comment} of a YAML file of carlos's (mappings written one key a line)."""
    comments: dict[str, str] = {}
    stack: list[tuple[int, str]] = []  # (indent, key) of the mappings the current line is inside
    package = prefix
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# @package "):
            package = line.split()[-1] + "."
            continue
        m = LINE.match(line)
        if not m or line.lstrip().startswith("- "):
            continue
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = ".".join([*(k for _, k in stack), m["key"]])
        if m["comment"]:
            comments[package + key] = m["comment"].strip()
        if not m["value"].strip():
            stack.append((indent, m["key"]))
    return comments


def _meanings(command: str, choices: dict[str, str]) -> dict[str, str]:
    """The comments of the command's config and of the options its groups have chosen."""
    root = conf_dir()
    meanings = yaml_comments(root / f"{command}.yaml")
    for group, option in choices.items():
        if option and (root / group / f"{option}.yaml").is_file():
            meanings.update(yaml_comments(root / group / f"{option}.yaml", f"{group}."))
    return meanings


def _shown(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    text = repr(value) if isinstance(value, str) and (not value.strip() or "\n" in value) else str(value)
    return text if len(text) <= 24 else text[:21] + "..."


def _row(meaning: str, default, defaults: dict) -> str:
    """A flag's meaning and default in one sentence: a comment that says what null does says the default
    itself, and a key it names shows that key's value."""
    for key in set(re.findall(r"\b[a-z_]+\.[a-z_.]+\b", meaning)) & set(defaults):
        meaning = meaning.replace(key, f"{key} ({_shown(defaults[key])})")
    if default is None and "null: " in meaning:
        return meaning.replace("null: ", "default: ", 1)
    if default is None and meaning.endswith("required"):
        return meaning
    return f"{meaning} (default {_shown(default)})"


def help_text(command: str, flags: dict[str, str]) -> str:
    """The help of `carlos <command>`: usage, the script-style flags, the config groups."""
    cfg = compose(command, [], with_hydra=True)
    choices = {g: c for g, c in dict(cfg.hydra.runtime.choices).items() if not g.startswith("hydra")}
    defaults, meanings = config_keys(cfg), _meanings(command, choices)
    lines = [f"usage: carlos {command} [--flag value ...] [key=value ...]", "", "flags (each sets a config key):"]
    for flag, key in flags.items():
        lines.append(f"  --{flag:<17} {_row(meanings.get(key, ''), defaults.get(key), defaults)}")
    if any(not g.startswith("hydra") for g in choices):
        lines += ["", "config groups (group=option):"]
        for group, chosen in sorted(choices.items()):
            options = [f"{o} (default)" if o == chosen else o for o in group_options(group)]
            lines.append(f"  {group}: {', '.join(options)}" + ("" if chosen else "  (none by default)"))
    lines += [
        "",
        f"every key and its value: carlos {command} --cfg job; Hydra's own flags: carlos {command} --hydra-help",
    ]
    return "\n".join(lines)
