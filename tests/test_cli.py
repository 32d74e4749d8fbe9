import dataclasses

import pytest
from click.testing import CliRunner

from mozgach_mlx.cli import DEFAULT_RUN_TRAIN, build_configs, main
from mozgach_mlx.errors import ConfigError
from mozgach_mlx.lora import LoRAConfig
from mozgach_mlx.rundir import SYNTHETIC_RUN_TRAIN, RunConfig
from mozgach_mlx.trainer import TrainConfig


def _cli(**kw):
    """What click passes for the options the user gave (the rest arrive as None)."""
    return kw


def test_builtin_default_uses_the_preset_and_cli_wins_over_yaml():
    run, t = build_configs(_cli(), {})
    assert run.model == "tiny-stdlib" and run.data == "stdlib12"  # recorded as the corpus it is
    assert (t.max_steps, t.learning_rate, t.max_seq_length, t.grad_accumulation) == tuple(
        DEFAULT_RUN_TRAIN[k] for k in ("max_steps", "learning_rate", "max_seq_length", "grad_accumulation"))
    assert t.lora.targets == ("all-linear",) and t.lora.dropout == 0.0
    # the random tiny base keeps the synthetic corpus and its own short schedule
    run, t = build_configs(_cli(model="tiny"), {})
    assert run.data is None and (t.max_steps, t.max_seq_length) == \
        (SYNTHETIC_RUN_TRAIN["max_steps"], SYNTHETIC_RUN_TRAIN["max_seq_length"])
    assert t.lora.targets == LoRAConfig().targets
    assert build_configs(_cli(model="tiny", data="synthetic"), {})[1] == t
    # the built-in base on other data gets the seed's defaults
    assert build_configs(_cli(data="synthetic"), {})[1] == TrainConfig()

    yaml_cfg = {"out": "from_yaml", "train": {"learning_rate": 1e-3, "epochs": 2}, "lora": {"r": 8}}
    run, t = build_configs(_cli(learning_rate=5e-4, lora_alpha=4.0), yaml_cfg)
    assert run.out == "from_yaml"
    assert t.learning_rate == 5e-4  # CLI > YAML
    assert t.epochs == 2  # YAML > preset/defaults
    assert (t.lora.r, t.lora.alpha) == (8, 4.0)


def test_user_model_gets_the_seed_defaults_not_the_preset():
    run, t = build_configs(_cli(model="some/dir", data="d"), {})
    d = TrainConfig()
    assert (t.learning_rate, t.warmup_steps, t.grad_accumulation, t.max_grad_norm, t.epochs, t.max_steps) == \
        (d.learning_rate, d.warmup_steps, d.grad_accumulation, d.max_grad_norm, d.epochs, None)


def test_lora_targets_from_cli_and_rope_flags():
    run, t = build_configs(_cli(lora_targets="q_proj, v_proj", rope_scaling="linear", rope_factor=4.0), {})
    assert t.lora.targets == ("q_proj", "v_proj")
    assert run.rope_dict() == {"type": "linear", "factor": 4.0}


@pytest.mark.parametrize("cli,yaml_cfg,match", [
    ({}, {"bogus": 1}, "unknown top-level key"),
    ({}, {"train": {"lr": 1}}, "unknown key.*'train:'"),
    ({"quantize": "3"}, {}, "--quantize"),
    ({"rope_factor": 2.0}, {}, "without --rope-scaling"),
    ({"rope_scaling": "linear"}, {}, "needs --rope-factor"),
    ({"learning_rate": -1.0}, {}, "TrainConfig.learning_rate"),
])
def test_bad_options_are_config_errors(cli, yaml_cfg, match):
    with pytest.raises(ConfigError, match=match):
        run, _ = build_configs(_cli(**cli), yaml_cfg)
        run.quant_bits()
        run.rope_dict()


def test_help_lists_the_issue_flags():
    out = CliRunner().invoke(main, ["train", "--help"]).output
    for flag in ("--model", "--data", "--out", "--domains", "--max-seq-length", "--rope-scaling", "--rope-factor",
                 "--quantize", "--lora-r", "--lora-alpha", "--lora-dropout", "--learning-rate", "--seed",
                 "--quiet", "--config", "--grad-accumulation", "--max-grad-norm", "--epochs"):
        assert flag in out, flag


def test_optional_bool_fields_are_flag_pairs_that_default_to_auto():
    """TrainConfig.grad_checkpoint is bool | None: --grad-checkpoint / --no-grad-checkpoint, absent = None (auto)."""
    cmd = main.commands["train"]
    for args, want in (([], None), (["--grad-checkpoint"], True), (["--no-grad-checkpoint"], False)):
        params = cmd.make_context("train", list(args)).params
        assert params["grad_checkpoint"] is want
        assert build_configs(params | {"model": "some/dir", "data": "d"}, {})[1].grad_checkpoint is want


def test_bad_flag_value_exits_2_with_one_line(tmp_path):
    res = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "o"), "--quantize", "3", "--quiet"])
    assert res.exit_code == 2
    assert res.output.strip().startswith("error: --quantize '3'")


def test_train_then_generate_and_plan_from_the_cli(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", "--model", "tiny", "--out", str(out), "--n-domains", "2", "--domains", "2",
                                  "--max-steps", "2",
                                  "--max-seq-length", "64", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "1 trained, 0 already done, 0 failed" in r.output
    assert (out / "mozgach108_002" / "adapters.safetensors").exists()
    assert not (out / "mozgach108_001").exists()  # --domains 2 only
    g = CliRunner().invoke(main, ["generate", "--out", str(out), "--adapter", "mozgach108_002", "--prompt", "a",
                                  "--max-tokens", "5"])
    assert g.exit_code == 0, g.output
    assert len(g.output.rstrip("\n")) <= 5  # 5 byte tokens at most (EOS stops earlier)
    p = CliRunner().invoke(main, ["plan", "--context", "4096", "--memory-gb", "1", "--backend", "cpu"])
    assert p.exit_code == 0 and "budget 1.0 GiB: fits" in p.output, p.output


def test_every_cli_option_defaults_to_none_so_the_dataclasses_are_the_one_source():
    import click

    for name, cmd in main.commands.items():
        for p in cmd.params:
            if isinstance(p, click.Option) and p.name != "help":
                assert p.required or p.default is None, f"mozgach {name} {p.opts[0]} defaults to {p.default!r}"
    # what the options then resolve to: the dataclass fields, field by field
    run, t = build_configs(_cli(model="some/dir", data="d"), {})
    assert t == TrainConfig() and t.lora == LoRAConfig()
    assert dataclasses.replace(run, model=RunConfig.model, data=None) == RunConfig()


def test_plan_generate_and_lora_layer_defaults_are_the_dataclass_fields():
    import inspect

    import mozgach_mlx as mz
    from mozgach_mlx.bank import AdapterBank, GenerationConfig
    from mozgach_mlx.lora import LoRALinear

    t, lc, run = TrainConfig(), LoRAConfig(), RunConfig()
    p = inspect.signature(mz.plan).parameters
    assert (p["batch_size"].default, p["lora_rank"].default, p["lora_targets"].default, p["quantize"].default,
            p["group_size"].default, p["mlp_chunk"].default, p["loss_chunk"].default) == \
        (t.batch_size, lc.r, lc.targets, run.quant_bits(), run.group_size, t.mlp_chunk, t.loss_chunk)
    g = inspect.signature(AdapterBank.generate).parameters
    assert (g["max_tokens"].default, g["temperature"].default) == \
        (GenerationConfig().max_tokens, GenerationConfig().temperature)
    assert {o.name for o in main.commands["generate"].params} >= {f.name for f in dataclasses.fields(GenerationConfig)}
    layer = inspect.signature(LoRALinear).parameters
    assert (layer["r"].default, layer["alpha"].default, layer["dropout"].default, layer["rslora"].default) == \
        (lc.r, lc.alpha, lc.dropout, lc.rslora)


def test_plan_command_without_options_is_the_default_plan():
    import mozgach_mlx as mz

    res = CliRunner().invoke(main, ["plan"])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == mz.plan(RunConfig.model).table().strip()


def _one_line_exit_2(res):
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.output, res.output
    return lines[0]


def test_yaml_numbers_are_numbers_and_bad_types_are_one_line(tmp_path):
    from mozgach_mlx.typecheck import load_yaml

    good = tmp_path / "good.yaml"
    good.write_text("train:\n  learning_rate: 1e-4\n  max_steps: 1e3\nlora:\n  alpha: 2E1\n")
    run, t = build_configs(_cli(), load_yaml(good), source=f"--config {good}")
    assert (t.learning_rate, t.max_steps, t.lora.alpha) == (1e-4, 1000, 20.0)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: many\n")
    line = _one_line_exit_2(CliRunner().invoke(main, ["train", "--config", str(bad)]))
    assert str(bad) in line and "max_steps='many'" in line and "integer" in line
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1, 2\n  lora: {\n")
    line = _one_line_exit_2(CliRunner().invoke(main, ["train", "--config", str(broken)]))
    assert "invalid YAML at line" in line


def test_user_errors_are_one_line_exit_2(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    assert "is a file" in _one_line_exit_2(CliRunner().invoke(main, ["train", "--out", str(f)]))
    assert "--max-steps" in _one_line_exit_2(CliRunner().invoke(main, ["train", "--max-steps", "many"]))
    assert "no manifest" in _one_line_exit_2(CliRunner().invoke(main, ["eval", "--out", str(tmp_path / "none")]))
    assert "max_tokens" in _one_line_exit_2(CliRunner().invoke(main, ["generate", "--prompt", "a",
                                                                       "--max-tokens", "0"]))


def test_internal_error_is_one_line_with_the_debug_hint(monkeypatch):
    import sys

    plan_mod = sys.modules["mozgach_mlx.plan"]  # `mozgach_mlx.plan` the attribute is the function

    def boom(*a, **k):
        raise RuntimeError("kaput")

    monkeypatch.setattr(plan_mod, "plan", boom)
    res = CliRunner().invoke(main, ["plan"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.strip().splitlines() == [
        "error: internal error (RuntimeError: kaput); run again with --debug for the traceback"]
    res = CliRunner().invoke(main, ["plan", "--debug"])
    assert isinstance(res.exception, RuntimeError)


def test_a_second_process_on_a_run_directory_refuses(tmp_path):
    import os
    import subprocess
    import sys

    from mozgach_mlx import rundir

    code = ("import sys, time; from mozgach_mlx import rundir\n"
            "with rundir.locked(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"in use by another mozgach process \\(pid {holder.pid}\\)"):
            with rundir.locked(tmp_path):
                pass
        line = _one_line_exit_2(CliRunner().invoke(main, ["train", "--out", str(tmp_path)]))
        assert str(holder.pid) in line
    finally:
        holder.kill()
        holder.wait()
    # killed with SIGKILL: the kernel dropped the lock; the stale .lock file does not block
    assert (tmp_path / rundir.LOCK_FILE).exists()
    with rundir.locked(tmp_path):
        assert (tmp_path / rundir.LOCK_FILE).read_text().strip() == str(os.getpid())
        with rundir.locked(tmp_path):  # re-entrant within the holding process
            pass
