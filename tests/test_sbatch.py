"""sbatch's refusals without a cluster (carlos/slurm.py): the one line with sbatch's own words and the
launcher keys that fix them, and a refused sweep's start taken back. The real refusals, on the local
cluster: tests/test_slurm.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from carlos.slurm import explain

LAUNCHER = {"gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 32, "nodes": 1, "tasks_per_node": 1, "timeout_min": 240}
NODE = {"partition": "debug", "default": True, "cpus": 2, "mem_mb": 23639, "gres": "(null)", "time": "infinite"}
NO_CONFIG = "sbatch: error: Batch job submission failed: Requested node configuration is not available\n"
CASES = {  # sbatch's stderr, the launcher's settings that differ from its defaults, sinfo's nodes -> the line holds
    "gres": (
        "sbatch: error: Invalid generic resource (gres) specification\n",
        {},
        [NODE],
        [
            "sbatch refused the jobs: Invalid generic resource (gres) specification; the jobs ask for "
            "hydra.launcher.gpus_per_node=1, and the nodes here have no GPUs: pass hydra.launcher.gpus_per_node=0"
        ],
    ),
    "gres-no-sinfo": (
        "sbatch: error: Invalid generic resource (gres) specification\n",
        {"gpus_per_node": 0, "mem_per_gpu": 4},
        [],
        ["hydra.launcher.mem_per_gpu=4:", "sinfo -o '%P %G'", "pass hydra.launcher.mem_per_gpu=null"],
    ),
    "memory": (
        "sbatch: error: Memory specification can not be satisfied\n" + NO_CONFIG,
        {"gpus_per_node": 0},
        [NODE],
        [
            "refused the jobs: Memory specification can not be satisfied; ",
            "hydra.launcher.mem_gb=32, and a node",
            "pass hydra.launcher.mem_gb=23 or less",
        ],
    ),
    "memory-per-cpu": (
        "sbatch: error: Memory specification can not be satisfied\n" + NO_CONFIG,
        {"mem_gb": None, "mem_per_cpu": 100000, "cpus_per_task": 2, "gpus_per_node": 0},
        [NODE],
        ["pass hydra.launcher.mem_per_cpu=11819 or less"],
    ),
    "memory-twice": (
        "sbatch: fatal: --mem, --mem-per-cpu, and --mem-per-gpu are mutually exclusive.\n",
        {"mem_per_cpu": 1000},
        [NODE],
        [
            "are mutually exclusive; the jobs set hydra.launcher.mem_gb=32, hydra.launcher.mem_per_cpu=1000",
            "hydra.launcher.mem_gb=null",
        ],
    ),
    "partition": (
        "sbatch: error: invalid partition specified: gpu\n"
        "sbatch: error: Batch job submission failed: Invalid partition name specified\n",
        {"partition": "gpu"},
        [NODE, {**NODE, "partition": "long", "default": False}],
        [
            "invalid partition specified: gpu; the jobs ask for hydra.launcher.partition=gpu",
            "the partitions here: debug, long",
            "hydra.launcher.partition=null for the default (debug)",
        ],
    ),
    "time": (
        "sbatch: error: Batch job submission failed: Requested time limit is invalid (missing or exceeds some limit)\n",
        {},
        [{**NODE, "time": "1:00:00"}],
        ["hydra.launcher.timeout_min=240 (the partition's limit: 1:00:00)"],
    ),
    "cpus": (
        "sbatch: error: Batch job submission failed: More processors requested than permitted\n",
        {"tasks_per_node": 2},
        [NODE],
        ["hydra.launcher.tasks_per_node=2, hydra.launcher.cpus_per_task=8", "pass hydra.launcher.cpus_per_task=1"],
    ),
    "node-size": (
        NO_CONFIG,
        {"gpus_per_node": 0},
        [NODE],
        [
            "hydra.launcher.cpus_per_task=8, hydra.launcher.mem_gb=32; the partition has 1 node of at most 2 CPUs",
            "pass hydra.launcher.cpus_per_task=2 hydra.launcher.mem_gb=23",
        ],
    ),
    "held-for-good": ("reason PartitionConfig", {"gpus_per_node": 0, "mem_gb": 1}, [NODE], ["cpus_per_task=2"]),
    "anything-else": (
        "sbatch: error: Batch job submission failed: Something new\n",
        {},
        [NODE],
        [
            "refused the jobs: Batch job submission failed: Something new; check the launcher's settings, "
            "hydra.launcher.KEY=VALUE",
            "--cfg hydra --package hydra.launcher",
        ],
    ),
    "silent": ("", {}, [], ["sbatch refused the jobs: no message; check the launcher's settings"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sbatchs_message_is_one_line_with_the_keys_that_fix_it(case):
    stderr, changed, nodes, parts = CASES[case]
    line = explain(stderr, {**LAUNCHER, **changed}, nodes)
    assert "\n" not in line
    for part in parts:
        assert part in line, line


def _tree(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every path under root with its size, mtime and, for a file, its bytes."""
    return {
        str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
        for p in root.rglob("*")
    }


@pytest.mark.skipif(importlib.util.find_spec("submitit") is None, reason="needs the carlos[sweep] extra")
@pytest.mark.parametrize("earlier", [False, True], ids=["new-sweep", "earlier-sweep"])
def test_a_refused_sweeps_start_is_taken_back(tmp_path, earlier):
    from carlos.slurm import _Start
    from carlos.sweep import SweepSummary

    w, sweep = tmp_path / "w", tmp_path / "w" / "sweeps" / "s"
    w.mkdir()
    (w / ".carlos-files").write_text('{"file": "splits.json"}\n')
    if earlier:  # the directory of an earlier sweep, continued (resume=auto): its job, multirun.yaml, logs
        (sweep / "0").mkdir(parents=True)
        (sweep / "0" / "job.json").write_text("{}\n")
        (sweep / "multirun.yaml").write_text("earlier: 1\n")
        (sweep / ".submitit" / "7").mkdir(parents=True)
    launcher = {"_target_": "hydra_plugins.x.SlurmLauncher", "submitit_folder": "${hydra.sweep.dir}/.submitit/%j"}
    hydra = {"sweep": {"dir": str(sweep)}, "launcher": launcher, "sweeper": {"storage": f"sqlite:///{w}/optuna.db"}}
    config = OmegaConf.create({"workdir": str(w), "hydra": hydra})
    before = _tree(tmp_path)
    start = _Start(config)
    SweepSummary().on_multirun_start(config)  # records a new sweep directory in the workdir's record
    # what Hydra, submitit and Optuna write before sbatch answers
    (sweep / ".submitit").mkdir(parents=True, exist_ok=True)
    (sweep / "multirun.yaml").write_text("refused: 1\n")
    (sweep / ".submitit" / f"{'a' * 32}.pkl").write_bytes(b"pickle")
    (sweep / ".submitit" / f".submission_file_{'b' * 32}.sh").write_text("#!/bin/bash\n")
    (w / "optuna.db").write_bytes(b"study")
    assert _tree(tmp_path) != before
    start.undo(submitted=False)
    assert _tree(tmp_path) == before
