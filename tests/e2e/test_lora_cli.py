"""`rlhf-dist` with LoRA (model.lora): bad input stops before any actor starts, with the fix; a
short run with adapter sync writes the adapter and the merged model, and starts no reference
actor. (Merged sync: tests/ray/test_lora_trainer.py.)"""

import json

import pytest

from helpers import run_cli

STARTED = "[start]"  # printed just before actors are created


def _fails_early(args, tmp_path, needle):
    result = run_cli([f"hydra.run.dir={tmp_path}/run", "experiment=smoke", *args], cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert needle in result.stderr, result.stderr
    assert STARTED not in result.stdout and "Traceback" not in result.stderr, result.stderr
    return result.stderr


def test_unknown_target_module_lists_the_models_linear_layers(tiny_model_dir, tmp_path):
    err = _fails_early([f"model.path={tiny_model_dir}", "model.lora.rank=8", "model.lora.target_modules=[c_attn]"],
                       tmp_path, "model.lora.target_modules has ['c_attn']")
    assert "'q_proj'" in err and "Fix:" in err


def test_rank_below_one_refused(tmp_path):
    _fails_early(["model.lora.rank=-4"], tmp_path, "model.lora.rank=-4")


@pytest.mark.parametrize("saved,asked", [(0, 8), (8, 0)])
def test_resume_across_full_and_lora_refused_before_start(tiny_model_dir, tmp_path, saved, asked):
    checkpoint = tmp_path / "checkpoints" / "step_00000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "COMPLETE.json").write_text(json.dumps({"step": 2, "algo": "grpo", "lora_rank": saved}))
    _fails_early([f"model.path={tiny_model_dir}", f"model.lora.rank={asked}", f"trainer.resume={checkpoint}"],
                 tmp_path, "cannot be loaded into this one")


@pytest.mark.ray
@pytest.mark.slow
def test_lora_run_with_adapter_sync_exports_adapter_and_merged_model(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(["experiment=smoke", f"model.path={tiny_model_dir}", f"trainer.run_dir={run_dir}",
                      f"hydra.run.dir={run_dir}", "model.lora.rank=8", "model.lora.export_merged=true",
                      "model.lora.sync=adapter", "trainer.save_final=true"], cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "reference=the base model (LoRA rank 8 adapters off" in result.stdout
    assert "LoRA rank 8, the engines get the adapter after each update" in result.stdout
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    synced = [m for m in metrics if "sync/verified_tensors" in m]
    assert synced and all(m["sync/verified_tensors"] == 28 for m in synced)  # A and B of 14 projections
    assert json.loads((run_dir / "actors.json").read_text())["actors"]
    assert not any(a["name"].startswith("reference") for a in json.loads((run_dir / "actors.json").read_text())["actors"])
    assert json.loads((run_dir / "final" / "adapter_config.json").read_text())["r"] == 8
    assert (run_dir / "final" / "merged" / "config.json").is_file()
    # a second run starts from that adapter (model.lora.path): the engines get it before the first
    # rollout (installed as their adapter), so step 1 already samples from base + adapter
    again = tmp_path / "again"
    result = run_cli(["experiment=smoke", f"model.path={tiny_model_dir}", f"trainer.run_dir={again}",
                      f"hydra.run.dir={again}", "model.lora.rank=8", f"model.lora.path={run_dir / 'final'}",
                      "model.lora.sync=adapter", "trainer.total_steps=1"], cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    first = [json.loads(line) for line in (again / "metrics.jsonl").read_text().splitlines()
             if '"kl/mean"' in line][0]
    assert first["kl/mean"] > 0 and first["sync/rollout_logprob_gap_max"] < 1e-3, first
