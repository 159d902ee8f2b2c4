"""trainkit-run accepts every option of torch's torchrun parser, with the same defaults."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

from launchers.run import (
    apply_trainkit_defaults,
    bind_workers_to_launcher,
    build_parser,
    explicit_options,
    resolve_exit_code,
)
from launchers.standalone import BACKEND_NAME, use_standalone_rendezvous
from trainkit.exit_codes import EXIT_PREEMPTED
from trainkit.preemption import ExitRecord


def torch_options() -> list[argparse.Action]:
    return [
        action
        for action in get_args_parser()._actions
        if action.option_strings and action.dest != "help"
    ]


def test_every_torchrun_option_exists_with_the_same_default_and_choices() -> None:
    ours = {action.dest: action for action in build_parser()._actions}
    for theirs in torch_options():
        mine = ours[theirs.dest]
        assert set(theirs.option_strings) <= set(mine.option_strings), theirs.option_strings
        assert mine.default == theirs.default, theirs.dest
        assert mine.choices == theirs.choices, theirs.dest
        assert mine.nargs == theirs.nargs, theirs.dest


@pytest.mark.parametrize("action", torch_options(), ids=lambda action: action.option_strings[-1])
def test_every_torchrun_option_parses_the_same(action: argparse.Action) -> None:
    if action.nargs == 0:
        argv = [action.option_strings[0]]
    else:
        value = (
            action.choices[0] if action.choices else ("3" if action.type in (int, float) else "3:4")
        )
        argv = [action.option_strings[-1], str(value)]
    argv += ["train.py", "--lr", "1"]
    expected = vars(get_args_parser().parse_args(argv))
    ours = vars(build_parser().parse_args(argv))
    assert {name: ours[name] for name in expected} == expected
    assert set(ours) - set(expected) == {
        "service",
        "metrics_port",
        "metrics_host",
        "fork_workers",
    }  # trainkit's own options


def test_pet_variables_take_precedence_over_defaults_but_not_flags(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PET_NPROC_PER_NODE", "3")
    monkeypatch.setenv("PET_MAX_RESTARTS", "2")
    args = build_parser().parse_args(["--max-restarts", "5", "x.py"])
    assert (args.nproc_per_node, args.max_restarts) == ("3", 5)


def test_explicit_options_counts_flags_and_pet_variables() -> None:
    parser = build_parser()
    argv = ["--nnodes", "2", "--standalone", "x.py", "--nproc-per-node", "9"]
    chosen = explicit_options(parser, argv, {"PET_RDZV_ENDPOINT": "svc:29400"})
    assert {"nnodes", "standalone", "rdzv_endpoint", "training_script"} <= chosen
    assert "nproc_per_node" not in chosen  # after the script: the script's own argument


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["x.py"], {"TRAINKIT_GRACE_PERIOD_S": "25"}, 25),
        (["--shutdown-timeout", "7", "x.py"], {"TRAINKIT_GRACE_PERIOD_S": "25"}, 7),
        (["x.py"], {"TRAINKIT_GRACE_PERIOD_S": "25", "PET_SHUTDOWN_TIMEOUT": "9"}, 9),
        (["x.py"], {}, None),
    ],
)
def test_shutdown_timeout_defaults_from_the_grace_period(
    argv: list[str], env: dict[str, str], expected: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_trainkit_defaults(parser, args, explicit_options(parser, argv, env), env)
    assert args.shutdown_timeout == expected


def test_exit_code_resolution() -> None:
    assert resolve_exit_code({0: 3, 1: 4}, first_rank=1) == 1
    agreed = ExitRecord(EXIT_PREEMPTED, step=20, committed=True)
    both = {0: EXIT_PREEMPTED, 1: EXIT_PREEMPTED}
    assert resolve_exit_code(both, first_rank=0, records={0: agreed, 1: agreed}) == EXIT_PREEMPTED
    assert resolve_exit_code(both, first_rank=0) == 1  # 75 without an agreed save is a crash
    assert resolve_exit_code({0: EXIT_PREEMPTED, 1: -9}, first_rank=0, records={0: agreed}) == 1
    assert resolve_exit_code({0: -9, 1: EXIT_PREEMPTED}, first_rank=0) == 1


@pytest.mark.parametrize(
    ("argv", "mode", "target"),
    [
        (["train.py", "--lr", "1"], "script", "train.py"),
        (["-m", "pkg.train", "--lr", "1"], "module", "pkg.train"),
        (["--no-python", "prog", "--lr", "1"], "exec", "prog"),
    ],
)
def test_workers_start_through_the_bootstrap(argv: list[str], mode: str, target: str) -> None:
    args = build_parser().parse_args(argv)
    bind_workers_to_launcher(args, 4242)
    assert (args.module, args.no_python, args.training_script) == (
        True,
        False,
        "launchers.worker_bootstrap",
    )
    assert args.training_script_args == ["4242", mode, target, "--lr", "1"]


def test_run_path_workers_are_left_to_torch() -> None:
    args = build_parser().parse_args(["--run-path", "train.py"])
    bind_workers_to_launcher(args, 4242)
    assert (args.training_script, args.training_script_args) == ("train.py", [])


@pytest.mark.parametrize(
    ("argv", "replaced"),
    [
        (["--standalone", "--rdzv-id", "mine", "x.py"], True),
        (["x.py"], True),  # one node, default static backend: torch would go standalone too
        (["--nnodes", "2", "x.py"], False),
        (["--master-port", "29501", "x.py"], True),  # torch would reuse one store across restarts
        (["--nnodes", "2", "--master-port", "29501", "x.py"], False),
        (["--rdzv-backend", "c10d", "--rdzv-endpoint", "h:1", "x.py"], False),
    ],
)
def test_local_rendezvous_is_trainkits_loopback_backend(argv: list[str], replaced: bool) -> None:
    args = build_parser().parse_args(argv)
    before = (args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id)
    assert use_standalone_rendezvous(args) is replaced
    if replaced:
        assert (args.standalone, args.rdzv_backend, args.rdzv_endpoint) == (
            False,
            BACKEND_NAME,
            "localhost:0",
        )
        assert args.rdzv_id not in {"none", "mine"}  # a fresh random id, as torchrun gives
    else:
        assert (args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id) == before


@pytest.mark.parametrize("value", ["4", "cpu", "auto", "gpu", "xpu", "npu", "0", "-1", "two"])
def test_nproc_per_node_is_accepted_exactly_when_torchrun_accepts_it(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from torch.distributed.run import determine_local_world_size

    from launchers.run import _validate

    try:
        torch_error, torch_ok = None, determine_local_world_size(value) >= 1
    except (RuntimeError, ValueError) as error:
        torch_error, torch_ok = str(error), False
    parser = build_parser()
    args = parser.parse_args(["--nproc-per-node", value, __file__])
    if torch_ok:
        _validate(parser, args)
        return
    with pytest.raises(SystemExit) as exited:
        _validate(parser, args)
    assert exited.value.code == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert f"--nproc-per-node {value}" in line.replace("'", "")
    assert torch_error is None or torch_error in line  # torch's own reason, e.g. no CUDA


def test_a_directory_is_a_script_only_with_main(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from launchers.run import _validate

    parser = build_parser()
    app = tmp_path / "app"
    app.mkdir()
    with pytest.raises(SystemExit) as exited:
        _validate(parser, parser.parse_args([str(app)]))
    assert exited.value.code == 2
    assert f"training script '{app}' is a directory without __main__.py" in capsys.readouterr().err
    (app / "__main__.py").write_text("print('hello')\n")
    _validate(parser, parser.parse_args([str(app)]))  # python runs it, so torchrun does
