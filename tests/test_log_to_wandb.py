"""rundir.logger.log_to_wandb, the one W&B attach of the evaluators and the sweep report: tables,
images and summary fields logged once into a new or a resumed run; nothing when W&B is disabled."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
from wandb_records import offline_run  # noqa: E402

from rundir.logger import log_to_wandb  # noqa: E402


def wandb_cfg(mode: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(mode=mode, project="p", entity="", group="", name="", tags=()))


def test_tables_images_and_summary_logged_once_into_a_resumed_run(tmp_path):
  png = str(tmp_path / "plot.png")
  fig, ax = plt.subplots()
  ax.plot([0, 1])
  fig.savefig(png)
  tables = {"t/rows": (["a", "b"], [[1, 2.0], [3, None]])}
  first = log_to_wandb(str(tmp_path), wandb_cfg("offline"), {"x": 1}, job_type="sweep_report",
                       tables=tables, summary={"s/one": 1, "s/none": None})
  again = log_to_wandb(str(tmp_path), wandb_cfg("offline"), {"x": 1}, run_id=first, step=7,
                       job_type="sweep_report",
                       images={"t/plot": png}, summary={"s/two": 2.5})
  assert again == first
  run = offline_run(str(tmp_path / "wandb"), first)
  assert run["parts"] == 2 and run["run"].job_type == "sweep_report"
  assert run["summary"]["s/one"] == 1 and run["summary"]["s/two"] == 2.5
  assert "s/none" not in run["summary"]  # None fields are left out
  with_key = lambda name: [h for h in run["history"] if any(k.split(".")[0] == name or
                                                         k.startswith(name + "/") for k in h)]
  assert len(with_key("t/rows")) == 1  # (a table's and an image's fields are flattened)
  assert [h["_step"] for h in with_key("t/plot")] == [7]


def test_disabled_logs_nothing(tmp_path):
  assert log_to_wandb(str(tmp_path), wandb_cfg("disabled"), {}, tables={"t": (["a"], [[1]])}) is None
  assert not os.path.exists(tmp_path / "wandb" / "wandb")
