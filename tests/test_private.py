"""carlos/private.py against the installed libraries: each private API carlos uses still does what carlos
relies on, so that an upgrade that moves one fails here, by name, with what to fix."""

import math

import torch

from carlos import private


def test_lightning_still_reads_the_stop_flag_that_preemption_sets():
    import lightning as L

    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    moved = (
        f"lightning {L.__version__} moved trainer._signal_connector.received_sigterm, which carlos's Preemption "
        "callback sets to stop a run at a step boundary; update carlos/private.py and the lightning bound"
    )
    assert private.stop_flag(trainer) is False and trainer.received_sigterm is False, moved
    private.set_stop_flag(trainer, True)
    assert private.stop_flag(trainer) is True and trainer.received_sigterm is True, moved


def test_torch_muon_parts_orthogonalize_and_scale_the_lr():
    orthogonalize, adjust_lr = private.muon_parts()
    g = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    u = orthogonalize(g, (3.4445, -4.775, 2.0315), 5, 1e-7)
    singular = torch.linalg.svdvals(u.float())
    assert u.shape == g.shape and float(singular.min()) > 0.5 and float(singular.max()) < 1.5  # near-orthogonal
    assert adjust_lr(0.02, "original", (64, 16)) == 0.02 * math.sqrt(4)
    assert adjust_lr(0.02, None, (16, 64)) == 0.02


def test_wandb_logger_still_keeps_its_init_arguments_where_anonymous_is_dropped():
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(mode="disabled", project="p")
    assert "anonymous" in logger._wandb_init, "Lightning's WandbLogger no longer keeps anonymous in _wandb_init"
    private.drop_anonymous(logger)
    assert "anonymous" not in logger._wandb_init and logger._wandb_init["project"] == "p"


def test_hydra_config_store_still_keeps_plugin_configs_by_group_and_file_name():
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="hydra/launcher", name="carlos_private_test", node={"a": 1})
    launchers = ConfigStore.instance().repo["hydra"]["launcher"]
    assert "carlos_private_test.yaml" in launchers, "Hydra's ConfigStore.repo changed its layout"
    private.drop_registered(("launcher",), "carlos_private_test.yaml")
    assert "carlos_private_test.yaml" not in launchers


def test_hydra_overrides_parsed_once_and_lists_in_one_pass_hold_hydras_own_results(monkeypatch):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.overrides_visitor import HydraOverrideVisitor
    from hydra.grammar.gen.OverrideParser import OverrideParser

    private.parse_overrides_fast()
    one_pass, once = HydraOverrideVisitor.visitListContainer, OverridesParser.parse_rule
    assert hasattr(one_pass, "hydra") and hasattr(once, "hydra"), "Hydra's parser was not changed"
    text = "input=['a b.txt',x.txt,[1,2.5,null,[]],{k: v},int(3),'c,d',\"e\",${x},[]]"
    parser = OverridesParser.create()

    def indexed(*_):  # the quadratic way: every ctx.element(i) scans from the first child
        raise AssertionError("a list was read element by element through ctx.element(i)")

    with monkeypatch.context() as m:
        m.setattr(OverrideParser.ListContainerContext, "element", indexed)
        ours = parser.parse_override(text)
    ours.value()[2].append("changed by its caller")
    with monkeypatch.context() as m:  # parsed already: the text is not read again, and the copy is new
        m.setattr(OverrideParser, "override", indexed)
        again = parser.parse_override(text)
    monkeypatch.setattr(HydraOverrideVisitor, "visitListContainer", one_pass.hydra)
    monkeypatch.setattr(OverridesParser, "parse_rule", once.hydra)
    hydras = parser.parse_override(text)
    assert again == hydras and len(again.value()) == 9 and again.value()[2] == [1, 2.5, None, []], again
