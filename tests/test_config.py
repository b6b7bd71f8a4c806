"""Config validation: every mistake is one clear line before anything trains."""
import pytest


def _last_error_line(proc):
    lines = [l for l in (proc.stderr + proc.stdout).strip().splitlines() if l.strip()]
    return "\n".join(lines[-3:])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.batch_size=0", "data.batch_size=0 is not valid"),
        ("model.name=resnet9000", "model.name='resnet9000' is not valid; choose one of"),
        ("optim.lr=-1", "optim.lr=-1"),
        ("data.label_noise=1.5", "data.label_noise=1.5 is not valid; it must lie in [0, 1]"),
        ("optim=adam", "predicts K(t) for plain SGD only"),
        ("data.sampling=sorted", "data.sampling='sorted' is not valid; choose one of"),
        ("threads=0", "threads=0 is not valid"),
    ],
)
def test_invalid_values_are_one_line_errors(lipexp_cli, override, expected):
    proc = lipexp_cli("figure=train", "profile=smoke", override, check=False)
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (lipexp_cli.results / "train" / "runs").exists() or not any(
        (lipexp_cli.results / "train" / "runs").rglob("metrics.parquet")
    )


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model=resnet9000", "lipexp: config error: unknown model 'resnet9000'; valid options of model: "),
        ("train.no_such_key=3", "lipexp: config error: unknown key 'train.no_such_key'; valid keys of train: "),
        ("data.batch_size=abc", "could not be converted to Integer"),
        ("figure=fig_nope", "lipexp: config error: unknown figure 'fig_nope'; valid options of figure: "),
    ],
)
def test_unknown_keys_choices_and_types_are_rejected(lipexp_cli, override, expected):
    proc = lipexp_cli("figure=train", "profile=smoke", override, check=False)
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr[-2000:]


def test_unknown_group_lists_the_valid_choices(lipexp_cli):
    proc = lipexp_cli("figure=train", "model=resnet9000", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "convnet" in proc.stderr and "mlp" in proc.stderr


def test_list_prints_every_figure_config():
    import subprocess
    import sys

    from experiments.runner import CONF_DIR, list_figures

    out = subprocess.run([sys.executable, "-m", "experiments.runner", "list"], capture_output=True, text=True,
                         cwd=CONF_DIR.parent, check=True).stdout
    ids = [p.stem for p in (CONF_DIR / "figure").glob("*.yaml")]
    assert ids and all(i in out for i in ids)
    assert all(title for _, title in list_figures())


def test_figures_set_their_thread_default_and_the_command_line_wins():
    """Chapter 3 figures (small matrices) default to 1 torch thread, applied by the runner for the whole job."""
    from hydra import compose, initialize_config_dir

    from experiments.runner import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base=None):
        for fig in ("fig3_2", "fig3_3", "fig3_4", "table2_1", "bounds", "init_k0"):
            assert compose("config", [f"figure={fig}"]).threads == 1, fig
        assert compose("config", ["figure=fig3_2", "threads=2"]).threads == 2
        assert compose("config", ["figure=fig4_2"]).threads is None
