"""`dinoforge eval ...`: frozen-backbone evaluations. Each command lives beside its evaluation."""

import typer

from dinoforge.eval.depth import depth_command
from dinoforge.eval.knn import knn_command
from dinoforge.eval.linear import linear_command
from dinoforge.eval.logreg import logreg_command
from dinoforge.eval.retrieval import retrieval_command
from dinoforge.eval.segmentation import seg_command
from dinoforge.eval.video import video_command

app = typer.Typer(help="Frozen-backbone evaluations (JSON metrics in an output folder).", no_args_is_help=True)
app.command("knn")(knn_command)
app.command("linear")(linear_command)
app.command("logreg")(logreg_command)
app.command("retrieval")(retrieval_command)
app.command("seg")(seg_command)
app.command("depth")(depth_command)
app.command("video")(video_command)
