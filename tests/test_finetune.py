"""Fine-tuning engine: teacher = original via keep-all, PSS keep rates per step, resume bit-exact after SIGKILL,
two gloo ranks end equal, eval at several keep rates, and bad input as one line.

A tiny ViT (16 patches of 8x8, width 32, 2 blocks) on 200 / 100 real digits written as PNG folders by
``examples/digits.py``; one torch thread (tiny ops, and a CPU shared with other processes).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vitprune
from conftest import load_example
from vitprune.train.finetune import FinetuneConfig, distillation_loss, lr_factor, make_teacher
from vitprune.train.keep_rate_schedule import KeepSchedule, keep_count
from vitprune.ops.modules import TokenDrop

ROOT = Path(__file__).resolve().parent.parent
ARCH = "timm:vit_small_patch16_224"
ARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
CLI_ARGS = [a for k, v in ARGS.items() for a in ("--model-arg", f"{k}={v}")]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return vitprune.load(ARCH, model_args=ARGS)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    example = load_example("digits")
    root = tmp_path_factory.mktemp("digits")
    assert example.write_image_folders(root, max_train=200, max_val=100) == {"train": 200, "val": 100}
    assert sorted(p.name for p in (root / "train").iterdir()) == [str(d) for d in range(10)]
    with pytest.raises(FileExistsError):
        example.write_image_folders(root)
    return root


@pytest.fixture(scope="module")
def token_drop_dir(tmp_path_factory) -> Path:
    """The tiny model rewritten with token-drop keep 0.5 (training only), saved."""
    model = tiny_model()
    rewritten, _ = vitprune.rewrite(model, "token-drop", keep_rate=0.5)
    path = tmp_path_factory.mktemp("models") / "td"
    vitprune.save(rewritten, path)
    return path


def finetune_cli(*args) -> list[str]:
    return [sys.executable, "-m", "vitprune", "finetune", *map(str, args)]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "tensors.safetensors"))


# -- building blocks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, params", [("token-drop", dict(keep_rate=0.5, at_inference=True)),
                                            ("importance-mask", dict(keep="1:0.5"))])
def test_teacher_is_the_original_model_via_keep_all(method, params):
    original = tiny_model()
    rewritten, _ = vitprune.rewrite(original, method, **params)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    teacher, context = make_teacher(rewritten)
    with torch.no_grad():
        assert not torch.allclose(rewritten.eval()(x), original(x), atol=1e-3)  # the rewrite does drop tokens
        with context():
            assert torch.allclose(teacher(x), original(x), atol=1e-6, rtol=0)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(p is not q for p, q in zip(teacher.parameters(), rewritten.parameters()))


def test_loss_and_lr_pieces():
    s, t = torch.randn(8, 10), torch.randn(8, 10)
    assert distillation_loss(t, t, 2.0) == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(s, t, 1.0) > 0
    ref = torch.nn.functional.kl_div(s.log_softmax(-1), t.softmax(-1), reduction="batchmean")
    assert distillation_loss(s, t, 1.0) == pytest.approx(float(ref), rel=1e-5)
    factors = [lr_factor(i, 100, 10, 0.01) for i in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(b <= a for a, b in zip(factors[10:], factors[11:])) and factors[-1] == pytest.approx(0.01, abs=1e-3)


def test_pss_keep_rate_set_before_every_step(digits, token_drop_dir, tmp_path):
    model = vitprune.load(token_drop_dir)
    seen = []  # tokens the blocks saw in each training forward

    def record(module, args, out):
        if module.training:
            seen.append(out.shape[1])

    for m in model.modules():
        if isinstance(m, TokenDrop):
            m.register_forward_hook(record)  # copied into the fine-tuned model
    result = vitprune.finetune(model, digits / "train", tmp_path / "run", val=digits / "val", epochs=3,
                               batch_size=32, schedule="cyclic", keep_start=1.0, keep_end=0.2, cooldown_epochs=1,
                               distill=False)
    steps = 7  # ceil(200 / 32)
    rates = KeepSchedule("cyclic", 1.0, 0.2, 3, steps, 1, 0.2).rates()
    assert seen == [1 + keep_count(16, r) for r in rates]
    assert len(set(seen[:14])) >= 4 and set(seen[14:]) == {17}  # several shapes, then the cool-down epoch
    assert result.history[0]["keep_rate_steps"] == {"0.4": 2, "0.6": 2, "0.8": 2, "1": 1}
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in lines] == [1, 2, 3] and lines == result.history
    assert lines[0]["val_images"] == 100 and lines[0]["train_images"] == 200
    saved = vitprune.load(tmp_path / "run" / "model")
    assert [m.keep_count for m in saved.modules() if isinstance(m, TokenDrop)] == [8]  # the rewrite's own count
    assert saved.meta["vitprune"]["report"]["finetune"]["config"]["schedule"] == "cyclic"


def test_default_teacher_distils_a_rewritten_model(digits, token_drop_dir, tmp_path):
    result = vitprune.finetune(vitprune.load(token_drop_dir), digits / "train", tmp_path / "run", epochs=1,
                               batch_size=64, lr=1e-3)
    assert result.history[0]["train_distill"] > 0
    assert result.history[0]["train_loss"] == pytest.approx(
        result.history[0]["train_ce"] + 0.5 * result.history[0]["train_distill"], rel=1e-6)
    assert result.model_path == tmp_path / "run" / "model"
    assert not result.model.training and len(list((tmp_path / "run" / "checkpoints").iterdir())) == 1


# -- resume and data-parallel ------------------------------------------------------------------------------


def test_resume_after_sigkill_ends_with_the_same_weights(digits, token_drop_dir, tmp_path):
    common = [token_drop_dir, "--data", digits / "train", "--val", digits / "val", "--epochs", 5, "--batch-size", 32,
              "--schedule", "cyclic", "--lr", "2e-3", "--quiet"]
    full = subprocess.run(finetune_cli(*common, "-o", tmp_path / "full"), env=ENV, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr

    part = tmp_path / "part"
    proc = subprocess.Popen(finetune_cli(*common, "-o", part), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (part / "checkpoints" / "epoch-0001").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before the first checkpoint appeared: " + proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (part / "model").exists(), "killed too late: the run had finished"
    done = sorted(p.name for p in (part / "checkpoints").glob("epoch-*"))
    assert done and done[-1] < "epoch-0005"

    resumed = subprocess.run(finetune_cli(*common, "-o", part, "--resume"), env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a, b = weights(tmp_path / "full" / "model"), weights(part / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4, 5]
    full_metrics = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [m["train_loss"] for m in metrics] == [m["train_loss"] for m in full_metrics]


def test_resume_refuses_other_options(digits, token_drop_dir, tmp_path, cli_inprocess):
    args = ["finetune", token_drop_dir, "--data", digits / "train", "--epochs", 1, "--batch-size", 64, "-o", tmp_path / "r"]
    code, _, err = cli_inprocess(*args, "--quiet")
    assert code == 0, err
    code, _, err = cli_inprocess(*args, "--lr", "1e-3", "--resume", "--quiet")
    assert code == 1 and err.startswith("vitprune: error: --resume:") and "lr=" in err and err.count("\n") == 1


DDP_SCRIPT = """
import os, sys, torch, vitprune
from safetensors.torch import save_file
torch.set_num_threads(1)
model_dir, data, out, dump = sys.argv[1:]
result = vitprune.finetune(vitprune.load(model_dir), data + "/train", out, val=data + "/val", epochs=2,
                           batch_size=16, schedule="cyclic", lr=2e-3)
state = {k: v.detach().contiguous() for k, v in result.model.state_dict().items()}
save_file(state, os.path.join(dump, "rank%s.safetensors" % os.environ["RANK"]))
"""


def test_two_gloo_ranks_end_with_the_same_weights(digits, token_drop_dir, tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script,
           token_drop_dir, digits, tmp_path / "out", tmp_path]
    done = subprocess.run(list(map(str, cmd)), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    start = vitprune.load(token_drop_dir).state_dict()
    assert any(not torch.equal(r0[k], start[k]) for k in r0)  # it did train
    saved = weights(tmp_path / "out" / "model")
    assert all(torch.equal(saved[k], r0[k]) for k in saved)  # rank 0 saved it
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["train_images"] for m in metrics] == [200, 200]  # 100 per rank, all-reduced
    assert [m["val_images"] for m in metrics] == [100, 100]


# -- eval ----------------------------------------------------------------------------------------------------


def test_eval_at_several_keep_rates(digits, token_drop_dir, cli_inprocess):
    code, out, err = cli_inprocess("eval", token_drop_dir, "--data", digits / "val", "--keep-rate", "1.0,0.5,0.25",
                                   "--json")
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert [r["keep_rate"] for r in rows] == [1.0, 0.5, 0.25] and [r["keep_counts"] for r in rows] == [[16], [8], [4]]
    assert all(0 <= r["top1"] <= r["top5"] <= 1 and r["images"] == 100 for r in rows)
    original = vitprune.evaluate(tiny_model(), digits / "val")["rows"]
    assert len(original) == 1 and rows[0]["top1"] == original[0]["top1"]  # keep rate 1.0 = the original model
    assert rows[0]["loss"] == pytest.approx(original[0]["loss"], rel=1e-5)
    assert rows[2]["loss"] != pytest.approx(rows[0]["loss"], rel=1e-5)  # dropping does change the outputs
    again = vitprune.evaluate(token_drop_dir, digits / "val", keep_rates=[0.25])["rows"][0]
    assert again["loss"] == rows[2]["loss"]  # random selection is seeded

    code, out, err = cli_inprocess("eval", token_drop_dir, "--data", digits / "val")
    assert code == 0 and "as saved" in out and "top-5" in out
    assert "eval: 2/2 batches, " in err and "top1 " in err  # plain progress where stderr is no terminal


def test_baseline_timm_model_finetunes_and_evaluates(digits, tmp_path, cli_inprocess):
    code, out, err = cli_inprocess("finetune", ARCH, *CLI_ARGS, "--data", digits / "train", "--val", digits / "val",
                                   "--epochs", 1, "--batch-size", 64, "-o", tmp_path / "base")
    assert code == 0, err
    assert "val top-1" in out and "saved" in out  # the summary table
    assert "finetune epoch 1/1: 4/4 steps, " in err  # stderr is no terminal here: a plain progress line, no bar
    metrics = json.loads((tmp_path / "base" / "metrics.jsonl").read_text())
    assert metrics["train_distill"] is None and metrics["keep_rate_mean"] == 1.0  # no teacher, every token
    code, out, err = cli_inprocess("eval", tmp_path / "base", "--data", digits / "val", "--json")
    assert code == 0, err
    assert len(json.loads(out)["rows"]) == 1 and json.loads(out)["rows"][0]["top1"] == pytest.approx(metrics["val_top1"])


# -- bad input -------------------------------------------------------------------------------------------------


def test_bad_input_is_one_line(digits, token_drop_dir, tmp_path, cli_inprocess):
    (tmp_path / "empty").mkdir()
    (tmp_path / "noimg" / "cat").mkdir(parents=True)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    train = digits / "train"
    cases = {
        "missing data": (["--data", tmp_path / "nope", "-o", tmp_path / "o1"], "no such folder"),
        "empty data": (["--data", tmp_path / "empty", "-o", tmp_path / "o2"], "no class sub-folders"),
        "class without images": (["--data", tmp_path / "noimg", "-o", tmp_path / "o3"], "has no images"),
        "resume without checkpoint": (["--data", train, "--resume", "-o", tmp_path / "o4"], "no checkpoint"),
        "output exists": (["--data", train, "-o", tmp_path / "taken"], "exists; pass --resume"),
        "not ours to overwrite": (["--data", train, "--overwrite", "-o", tmp_path / "taken"], "not a vitprune finetune"),
        "output is the input": (["--data", train, "-o", token_drop_dir], "overlaps the input"),
        "output inside the data": (["--data", train, "-o", train / "x"], "overlaps the input"),
        "bad keep schedule": (["--data", train, "--schedule", "cyclic", "--cooldown-epochs", 20, "-o", tmp_path / "o5"],
                              "cooldown"),
        "bad lr": (["--data", train, "--lr", "-1", "-o", tmp_path / "o6"], "--lr must be > 0"),
        "bad scale": (["--data", train, "--scale", "0.5", "-o", tmp_path / "o7"], "--scale"),
    }
    for name, (args, message) in cases.items():
        code, _, err = cli_inprocess("finetune", token_drop_dir, *args, "--epochs", 1)
        assert code != 0 and err.startswith("vitprune: error:") and message in err, (name, err)
        assert err.count("\n") == 1 and "Traceback" not in err, (name, err)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 8))
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine" and not (token_drop_dir / "checkpoints").exists()

    code, _, err = cli_inprocess("finetune", ARCH, *CLI_ARGS, "--data", train, "--schedule", "linear", "-o", tmp_path / "o8")
    assert code == 1 and "needs a token-drop model" in err
    code, _, err = cli_inprocess("eval", ARCH, *CLI_ARGS, "--data", digits / "val", "--keep-rate", "0.5")
    assert code == 1 and "no TokenDrop module" in err
    code, _, err = cli_inprocess("eval", token_drop_dir, "--data", digits / "val", "--keep-rate", "1.5")
    assert code == 1 and "keep rate must be in (0, 1]" in err
    code, _, err = cli_inprocess("eval", token_drop_dir, "--data", tmp_path / "empty")
    assert code == 1 and "no class sub-folders" in err and err.count("\n") == 1


def test_config_rejects_unknown_and_out_of_range_options():
    with pytest.raises(TypeError):
        FinetuneConfig(data="d", lrr=1.0)
    with pytest.raises(vitprune.VitpruneError, match="--label-smoothing"):
        FinetuneConfig(data="d", label_smoothing=1.0).check()


def test_finetune_lifespan_gather_trains_lives_with_the_budget_loss(digits, tmp_path):
    """lifespan-gather's training form: soft survival + budget loss; trained lives saved and reloaded."""
    model = vitprune.load(ARCH, model_args={**ARGS, "depth": 3})
    rewritten, _ = vitprune.rewrite(model, "lifespan-gather", flops=0.7, after_block=1)
    before = {k: v.clone() for k, v in rewritten.state_dict().items() if k.startswith("lifespan_gather")}
    result = vitprune.finetune(rewritten, digits / "train", tmp_path / "out", val=digits / "val", epochs=1,
                               batch_size=50, lr=1e-3, progress=False)
    trained = result.model.state_dict()
    assert any(not torch.equal(before[k], trained[k]) for k in before)  # the regressor learned
    lg = next(m for m in result.model.modules() if type(m).__name__ == "LifespanGather")
    assert lg.progress > 0.5  # tau was annealed along training
    again = vitprune.load(tmp_path / "out")
    x = torch.randn(2, 3, 32, 32)
    result.model.eval()
    again.eval()
    with torch.no_grad():
        assert torch.equal(result.model(x), again(x))
