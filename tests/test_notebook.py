"""examples/quickstart.ipynb runs top to bottom in a fresh kernel (nbclient), and what it
shows is true: each trained adapter beats the base on its validation data, both saved
layouts reload to the trained adapter's loss, the own adapter is lowest on each domain's
held-out text, routing picks it, and the loss plot is a real PNG.

The kernel is the notebook's ``python3``: jupyter_client starts it with this test's own
interpreter (a kernelspec argv of ``python`` means ``sys.executable``), so it sees the
same environment on any machine."""

import base64
import io
import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "quickstart.ipynb"


def _outputs(nb, kind: str) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == kind]


def test_quickstart_notebook_executes_and_its_results_hold(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not _outputs(nb, "stream") and not _outputs(nb, "display_data")  # committed without outputs
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert not _outputs(nb, "error")
    last = nb.cells[-1]["outputs"]
    summary = json.loads([o for o in last if o.output_type == "stream"][-1]["text"].strip().splitlines()[-1])
    base, trained = summary["base_valid"], summary["adapter_valid"]
    assert len(trained) == 3
    for name in trained:
        assert trained[name] < 0.5 * base[name], (name, trained[name], base[name])
    first = next(iter(trained))
    assert summary["reloaded"]["peft"] == pytest.approx(trained[first], abs=1e-4)
    assert summary["reloaded"]["mlx-lm"] == pytest.approx(trained[first], abs=1e-4)
    assert summary["own_is_lowest"] is True
    assert summary["routed"] == {n: n for n in trained}
    mix = summary["mix"]  # one held-out text of the first domain: own adapter < 50/50 mix < base
    assert mix["own"] < mix["mix"] < mix["base"]

    from matplotlib.image import imread

    pngs = [o["data"]["image/png"] for o in _outputs(nb, "display_data") if "image/png" in o["data"]]
    assert len(pngs) == 1
    img = imread(io.BytesIO(base64.b64decode(pngs[0])), format="png")
    assert img.shape[0] > 200 and img.shape[1] > 400 and img[..., :3].std() > 0.05
