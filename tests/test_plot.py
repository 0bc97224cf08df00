"""trainer/plot.py: the curves figure of metrics rows."""

from trainer.plot import PANELS, curves_figure, plot_metrics


def test_curves_figure_has_its_title_the_panel_titles_and_the_eval_points():
    rows = [{"iteration": 0, "eval/success_rate": 0.2},
            {"iteration": 1, "rollout/success_rate": 0.3, "train/loss": 1.0},
            {"iteration": 2, "rollout/success_rate": 0.5, "eval/success_rate": 0.45, "train/loss": 0.8}]
    figure = curves_figure(rows, "GRPO (continued from its export at iteration 17)")
    assert figure.get_suptitle() == "GRPO (continued from its export at iteration 17)"
    assert [axis.get_title() for axis in figure.axes] == [panel for panel, _ in PANELS]
    lines = {line.get_label(): line.get_xydata().tolist() for line in figure.axes[0].get_lines()}
    assert lines == {"rollout/success_rate": [[1, 0.3], [2, 0.5]], "eval/success_rate": [[0, 0.2], [2, 0.45]]}


def test_plot_metrics_writes_the_png(tmp_path):
    output = plot_metrics([{"iteration": 1, "train/loss": 1.0}], "run", tmp_path / "curves.png")
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [path.name for path in tmp_path.iterdir()] == ["curves.png"]  # no temporary file left
