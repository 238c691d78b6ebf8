"""The retrieval eval's pieces on CPU: task construction, reproducible (resumable) training
of the --tiny model, and one eval pass over it."""

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evals import eval as evaluation  # noqa: E402
from evals import qfilters, tasks, train  # noqa: E402


@pytest.mark.parametrize("task", tasks.TASKS)
def test_questions_ask_about_a_stored_pair(task):
    prompts, answers = tasks.eval_batch(task, seed=0, batch=4, length=300)
    q = tasks.QUESTION_LEN[task]
    assert prompts.shape[0] == 4 and answers.shape == (4, 2 if task == "niah" else 1)
    for prompt, answer in zip(prompts, answers):
        question, context = prompt[-q:], prompt[:-q]
        assert question[0] == tasks.QUERY and question[-1] == tasks.VALUE
        key = question[1:-1].tolist()
        if task == "niah":   # [KEY k1 k2 VALUE v1 v2] somewhere in the context
            record = torch.tensor([tasks.KEY, *key, tasks.VALUE, *answer.tolist()])
        else:                # [k v] somewhere in the context
            record = torch.tensor([*key, *answer.tolist()])
        windows = context.unfold(0, len(record), 1)
        assert bool((windows == record).all(-1).any())


def test_training_resumes_exactly(tmp_path):
    """3 + 3 steps with a resume in between give the same weights as 6 steps in one go."""
    common = ["--tiny", "--steps", "6", "--max-len", "64", "--workers", "0", "--batch", "4"]
    train.main(common + ["--out", str(tmp_path / "whole")])
    train.main(common + ["--out", str(tmp_path / "split"), "--stop-step", "3"])
    train.main(common + ["--out", str(tmp_path / "split"), "--resume", str(tmp_path / "split")])
    whole = torch.load(tmp_path / "whole" / "trainer_state.pt", weights_only=False)
    split = torch.load(tmp_path / "split" / "trainer_state.pt", weights_only=False)
    assert whole["step"] == split["step"] == 6
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, split["model"][name]), name
    # Q-Filters' directions of the tiny model (evals/qfilters.py), saved beside its checkpoint
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM
    tiny = LlamaForCausalLM.from_pretrained(tmp_path / "whole").eval()
    filters = qfilters.estimate(tiny, sequences=2, length=64, batch=2, samples=50)
    assert filters.shape == (tiny.config.num_hidden_layers, tiny.config.num_key_value_heads, tiny.config.head_dim)
    save_file({"qfilter": filters}, str(tmp_path / "whole" / qfilters.FILE))
    corr = qfilters.attention_correlation(tiny, filters, length=64)
    assert corr.shape == filters.shape[:2] and bool((corr.abs() <= 1 + 1e-6).all())
    variants = ["full", "snapkv", "keydiff (block-wise, 256)", "qfilters", "chunkkv (layer reuse 2)"]
    evaluation.run(tmp_path / "whole", samples=2, length=96, batch=2, seed=0, out=tmp_path / "r.json",
                   only=variants, seeds=2)
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    settings = {r["setting"] for r in rows}
    assert settings == set(evaluation.SETTINGS)
    # full once per setting and task, the others at every budget
    assert len(rows) == len(settings) * len(tasks.TASKS) * (1 + (len(variants) - 1) * len(evaluation.BUDGETS))
    assert all(0 <= r["accuracy"] <= 1 and r["samples"] == 2 and len(r["per_seed"]) == 2 for r in rows)
    assert all(r["ci95"] == pytest.approx(12.706 * abs(r["per_seed"][0] - r["per_seed"][1]) / 2) for r in rows)
    evaluation.render([tmp_path / "r.json"], tmp_path / "docs")
    table = (tmp_path / "docs" / "eval_retrieval.md").read_text()
    assert "| snapkv |" in table
    # a run split by policy over calls (perf/gpu_session eval PART) renders as the whole run
    whole = json.loads((tmp_path / "r.json").read_text())
    parts = [tmp_path / "part0.json", tmp_path / "part1.json"]
    for i, path in enumerate(parts):
        path.write_text(json.dumps(whole | dict(rows=[r for r in whole["rows"] if (r["policy"] == "qfilters") == i])))
    evaluation.render(parts, tmp_path / "split")
    split = (tmp_path / "split" / "eval_retrieval.md").read_text()
    assert sorted(split.splitlines()) == sorted(table.splitlines())   # the same rows (a part's come after)
    with pytest.raises(ValueError, match="--policies"):
        evaluation.run(tmp_path / "whole", 2, 96, 2, 0, only=["nope"])


def test_policies_list_keeps_commas_inside_a_name():
    assert evaluation.variant_names("full, keydiff (block-wise, 256),chunkkv (layer reuse 2)") == \
        ["full", "keydiff (block-wise, 256)", "chunkkv (layer reuse 2)"]


def test_every_step_eval_runs_and_renders(tmp_path):
    """evals/every_step.py end to end at toy size on the checkpoint (the decode kernel in the
    interpreter on the CPU): one variant, one budget, both tasks, then its table."""
    from evals import every_step
    name = "h2o (accumulated attention)"
    checkpoint = Path(__file__).resolve().parents[1] / "evals" / "checkpoint"
    results = every_step.run(checkpoint, samples=1, length=48, batch=1, seed=0, seeds=1, generated=1,
                             out=tmp_path / "r.json", only=[name], budgets=(0.25,))
    rows = results["rows"]
    assert [(r["policy"], r["task"]) for r in rows] == [(name, t) for t in tasks.TASKS]
    assert all(0 <= r["accuracy"] <= 1 and r["samples"] == 1 for r in rows)
    table = every_step.render(tmp_path / "r.json", tmp_path / "docs").read_text()
    assert f"| {name} |" in table and "n/a" not in table
