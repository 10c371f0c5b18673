"""The entry points: ``--version`` and ``--help`` without torch or Lightning, the torch thread count chosen as
documented (and its overrides), and ``import lightning_cnet`` light while every public name still works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata

import pytest
import torch

import lightning_cnet.cli  # noqa: F401 - imported here, Lightning's log handler binds the session's stderr
from lightning_cnet import launcher, threads
from lightning_cnet.threads import THREADS_VARIABLE, ThreadSettingError, choose_threads

HEAVY = ("torch", "pytorch_lightning", "lightning", "numpy", "jsonargparse", "timm")


def run_python(code: str, **environment: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", THREADS_VARIABLE)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**env, **environment})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def heavy_modules_after(code: str) -> tuple[list[str], str]:
    """Run ``code`` in a fresh interpreter; return the heavy modules it imported and what it printed before."""
    probe = f"import sys\n{code}\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)})))"
    result = run_python("import json\n" + probe)
    *printed, last = result.stdout.splitlines()
    return json.loads(last), "\n".join(printed)


# ---------------------------------------------------------------------- quick answers
def test_console_scripts_start_at_the_launcher() -> None:
    scripts = {e.name: e.value for e in metadata.entry_points(group="console_scripts")
               if e.name.startswith("lightning-cnet")}
    assert scripts == {"lightning-cnet": "lightning_cnet.launcher:lightning_cnet_main",
                       "lightning-cnet-analyze": "lightning_cnet.launcher:analyze_main"}


@pytest.mark.parametrize(("entry", "args", "expected"), [
    ("lightning_cnet_main", ["--version"], "lightning-cnet "),
    ("lightning_cnet_main", ["--help"], "usage: lightning-cnet "),
    ("lightning_cnet_main", ["-h"], "usage: lightning-cnet "),
    ("analyze_main", ["--version"], "lightning-cnet-analyze "),
    ("analyze_main", ["--help"], "usage: lightning-cnet-analyze "),
])
def test_version_and_help_import_nothing_heavy(entry, args, expected) -> None:
    heavy, printed = heavy_modules_after(f"from lightning_cnet.launcher import {entry}\n{entry}({args!r})")
    assert heavy == []
    assert printed.startswith(expected)
    if "--version" in args:
        assert printed.splitlines() == [expected + metadata.version("lightning-cnet")]
    else:
        assert max(map(len, printed.splitlines())) <= 80


def test_python_dash_m_runs_the_launcher() -> None:
    heavy, _ = heavy_modules_after("import runpy\nsys.argv = ['lightning_cnet', '--version']\n"
                                   "runpy.run_module('lightning_cnet', run_name='__main__')")
    assert heavy == []


def test_import_lightning_cnet_is_light_and_every_public_name_works() -> None:
    heavy, _ = heavy_modules_after("import lightning_cnet")
    assert heavy == []
    import lightning_cnet

    for name in lightning_cnet.__all__:
        assert getattr(lightning_cnet, name) is not None, name
    assert set(lightning_cnet.__all__) <= set(dir(lightning_cnet))
    assert lightning_cnet.__version__ == metadata.version("lightning-cnet")
    assert lightning_cnet.models.get_model is lightning_cnet.get_model  # submodules as attributes too
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        lightning_cnet.no_such_name  # noqa: B018


def test_the_help_lists_the_real_subcommands() -> None:
    from lightning_cnet.analysis.cli import _parser
    from lightning_cnet.cli import ContinuousNetCLI

    assert list(launcher.CLI_COMMANDS) == list(ContinuousNetCLI.subcommands())
    actions = [a for a in _parser()._actions if a.dest == "command"]
    real = {choice.dest: choice.help for choice in actions[0]._choices_actions}
    assert real == launcher.ANALYZE_COMMANDS


def test_analyze_module_answers_version_too(capsys) -> None:
    from lightning_cnet.analysis.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lightning-cnet-analyze {metadata.version('lightning-cnet')}"


# ---------------------------------------------------------------------- threads
@pytest.mark.parametrize(("environ", "cores", "load", "expected"), [
    ({}, 2, 0.1, None),                                   # idle: torch's default (one thread per core)
    ({}, 2, 0.6, 1),                                      # one core busy: one thread
    ({}, 2, 5.3, 1),                                      # busy: one thread, never none
    ({}, 16, 4.2, 12),                                    # a big machine keeps its free cores
    ({"OMP_NUM_THREADS": "2"}, 2, 9.0, None),             # OMP_NUM_THREADS is left to torch
    ({THREADS_VARIABLE: "3"}, 2, 0.0, 3),                 # the variable wins over the rule ...
    ({THREADS_VARIABLE: "2", "OMP_NUM_THREADS": "1"}, 2, 9.0, 2),  # ... and over OMP_NUM_THREADS
])
def test_the_thread_rule(environ, cores, load, expected) -> None:
    assert choose_threads(environ, cores=cores, load=load) == expected


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_a_bad_thread_setting_is_refused(value) -> None:
    with pytest.raises(ThreadSettingError, match=f"{THREADS_VARIABLE}='{value}' is not valid: expected a positive"):
        choose_threads({THREADS_VARIABLE: value}, cores=2, load=0.0)


SET_THEN_IMPORT = ("import lightning_cnet.threads as t\nt.load_average = lambda: {load}\nt.configure_threads()\n"
                   "import torch\nprint(torch.get_num_threads())")


@pytest.mark.parametrize(("load", "environment", "expected"), [
    (9.0, {}, 1),                               # a busy machine: one thread
    (9.0, {"OMP_NUM_THREADS": "2"}, 2),         # the user's OMP_NUM_THREADS stands
    (0.0, {THREADS_VARIABLE: "1"}, 1),          # the documented variable, on an idle machine too
])
def test_torch_starts_with_the_chosen_threads(load, environment, expected) -> None:
    result = run_python(SET_THEN_IMPORT.format(load=load), **environment)
    assert int(result.stdout.split()[-1]) == expected


def test_the_launcher_says_what_it_chose_and_hands_over(monkeypatch, capsys) -> None:

    handed: list = []
    monkeypatch.setattr(lightning_cnet.cli, "main", lambda args: handed.append((args, os.environ["OMP_NUM_THREADS"])))
    monkeypatch.setattr(threads, "load_average", lambda: 7.5)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    for name in ("OMP_NUM_THREADS", THREADS_VARIABLE):  # unset here, restored (or removed) afterwards
        monkeypatch.setenv(name, "1")
        monkeypatch.delenv(name)
    before = torch.get_num_threads()
    try:
        launcher.lightning_cnet_main(["fit", "--config", "x.yaml"])
    finally:
        torch.set_num_threads(before)
    assert handed == [(["fit", "--config", "x.yaml"], "1")]
    assert capsys.readouterr().err.splitlines() == [
        f"lightning-cnet: 1 torch thread (load average 7.5 on 2 cores; set {THREADS_VARIABLE} to choose)"]


def test_a_bad_thread_setting_ends_the_command_in_one_line(monkeypatch, capsys) -> None:
    monkeypatch.setenv(THREADS_VARIABLE, "many")
    with pytest.raises(SystemExit) as exit_info:
        launcher.analyze_main(["depth", "--ckpt_path", "x.ckpt"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"lightning-cnet-analyze: error: {THREADS_VARIABLE}='many' is not valid: expected a positive integer "
        "(the torch threads to use)"]


# ---------------------------------------------------------------------- Lightning's LeafSpec deprecation
def test_the_leafspec_deprecation_is_silenced_in_the_command_only() -> None:
    """Lightning's data loader utilities instantiate torch's deprecated ``LeafSpec``: the command hides that one
    warning; importing the package leaves the user's warning filters alone."""
    import warnings

    from pytorch_lightning.utilities._pytree import _tree_flatten

    before = list(warnings.filters)
    import lightning_cnet  # noqa: F401

    assert warnings.filters == before
    with warnings.catch_warnings(record=True) as plain:
        warnings.simplefilter("always")
        _tree_flatten(1)
    assert any("LeafSpec" in str(w.message) for w in plain), "the trigger this filter is for is gone: drop the filter"
    with warnings.catch_warnings(record=True) as in_command:
        warnings.simplefilter("always")
        launcher._quiet_lightning_warnings(["fit"])
        _tree_flatten(1)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, stacklevel=1)  # elsewhere: kept
    assert [str(w.message) for w in in_command] == ["`isinstance(treespec, LeafSpec)` is deprecated"]


def test_python_dash_m_of_the_analysis_module_goes_through_the_launcher() -> None:
    env = {**os.environ, THREADS_VARIABLE: "none"}
    result = subprocess.run([sys.executable, "-m", "lightning_cnet.analysis.cli", "depth", "--ckpt_path", "x.ckpt"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"lightning-cnet-analyze: error: {THREADS_VARIABLE}='none' is not valid: "
                                          "expected a positive integer (the torch threads to use)"]
