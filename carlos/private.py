"""Every private API of an outside library that carlos uses, one section per library, each for a reason
no public API serves. tests/test_private.py checks each against the installed library, so an upgrade
that changes one fails there, by name, rather than somewhere in a run."""

from __future__ import annotations

import copy
from typing import Any

# ---------------------------------------------------------------- Lightning (pinned below 2.7 for this)


def stop_flag(trainer: Any) -> bool:
    """Lightning's SIGTERM flag: set, the Trainer stops every rank at the same batch (rank 0's flag is
    broadcast each step) and raises SIGTERMException; carlos's Preemption sets it for its other signals."""
    return trainer._signal_connector.received_sigterm


def set_stop_flag(trainer: Any, value: bool) -> None:
    trainer._signal_connector.received_sigterm = value


# ---------------------------------------------------------------- torch


def muon_parts() -> tuple:
    """(_zeropower_via_newtonschulz, _adjust_lr) of torch's Muon: its orthogonalization and lr scaling,
    applied to one block of a stacked matrix at a time (torch's Muon takes whole parameters only)."""
    from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

    return _zeropower_via_newtonschulz, _adjust_lr


# ---------------------------------------------------------------- W&B


def drop_anonymous(logger: Any) -> None:
    """Lightning's WandbLogger passes anonymous=None to wandb.init, which wandb >= 0.19 answers with a
    deprecation warning on every run: dropped from the arguments it keeps for the call."""
    getattr(logger, "_wandb_init", {}).pop("anonymous", None)


# ---------------------------------------------------------------- Hydra


def drop_registered(group: tuple[str, ...], name: str) -> None:
    """A plugin's registered config hydra/<group>/<name>, so that carlos's YAML file of that name is read
    on its own: Hydra would use the registered one as the file's schema (see compose.py)."""
    from hydra.core.config_store import ConfigStore

    node = ConfigStore.instance().repo.get("hydra", {})
    for part in group:
        node = node.get(part, {})
    node.pop(name, None)


def parse_overrides_fast() -> None:
    """Two changes to Hydra's override parser, for long lists: 20,000 file arguments to prepare
    (input=[...]) took three minutes to start, against seconds for their directory. For this process:
    - its visitor took a list's i-th element with ctx.element(i), which scans the list's children from
      the first every time, quadratic in the list's length: now one pass over the children, the same
      elements in the same order;
    - a command parses each override four times (carlos's check of sweeps, then Hydra's compose for the
      check, for the run mode and for the run): now each text once, every caller given its own copy.
    tests/test_private.py holds both to Hydra's own results."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.overrides_visitor import HydraOverrideVisitor
    from hydra.grammar.gen.OverrideParser import OverrideParser

    hydra_visit, hydra_parse = HydraOverrideVisitor.visitListContainer, OverridesParser.parse_rule
    if hasattr(hydra_visit, "hydra"):
        return  # changed already
    parsed: dict[tuple[str, str], Any] = {}

    def visit_list(self, ctx: OverrideParser.ListContainerContext) -> list:
        return [self.visitElement(c) for c in ctx.getChildren() if isinstance(c, OverrideParser.ElementContext)]

    def parse_once(self, s: str, rule_name: str) -> Any:
        if (s, rule_name) not in parsed:
            parsed[s, rule_name] = hydra_parse(self, s, rule_name)
        return copy.deepcopy(parsed[s, rule_name])  # Hydra sets fields of what it gets back

    visit_list.hydra, parse_once.hydra = hydra_visit, hydra_parse
    HydraOverrideVisitor.visitListContainer, OverridesParser.parse_rule = visit_list, parse_once
