"""model.lora: bad values and bad targets fail before any actor starts, naming what was given,
what was expected and the fix; the names the engines get are the base model's own."""

import json

import pytest
import torch

from helpers import compose_config

from rlhf_dist.errors import ConfigError
from rlhf_dist.models.lora import (LoraSpec, add_adapters, base_params, check_resume, lora_layers,
                                   merged_weight, reference_off, resolve_lora)
from rlhf_dist.validation import validate


def test_lora_off_by_default_and_rank_validated():
    cfg = compose_config([])
    assert cfg.model.lora.rank == 0
    validate(cfg)
    with pytest.raises(ConfigError, match=r"model.lora.rank=-1.*Fix: model.lora.rank=8"):
        validate(compose_config(["model.lora.rank=-1"]))
    with pytest.raises(ConfigError, match=r"model.lora.path is set but model.lora.rank=0"):
        validate(compose_config(["model.lora.path=/x"]))
    with pytest.raises(ConfigError, match=r"dropout"):
        validate(compose_config(["model.lora.rank=8", "model.lora.dropout=1.5"]))
    with pytest.raises(ConfigError, match=r"stage=sft.*applies to the RL policy"):
        validate(compose_config(["model.lora.rank=8", "stage=sft"]))
    validate(compose_config(["model.lora.rank=8"]))


def test_target_modules_default_per_architecture_and_unknown_names_listed(tiny_model_dir):
    cfg = compose_config(["model.lora.rank=4"])
    spec = resolve_lora(cfg.model.lora, str(tiny_model_dir))
    assert spec.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = compose_config(["model.lora.rank=4", "model.lora.target_modules=[q_proj,c_attn]"])
    with pytest.raises(ConfigError) as err:
        resolve_lora(cfg.model.lora, str(tiny_model_dir))
    message = str(err.value)
    assert "['c_attn']" in message and "'down_proj'" in message and "Fix: model.lora.target_modules=[q_proj]" in message


def test_adapter_path_checked(tiny_model_dir, tmp_path):
    cfg = compose_config(["model.lora.rank=4", f"model.lora.path={tmp_path}"])
    with pytest.raises(ConfigError, match="not a PEFT adapter dir"):
        resolve_lora(cfg.model.lora, str(tiny_model_dir))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "target_modules": ["q_proj"]}))
    with pytest.raises(ConfigError, match="rank-8 adapter.*Fix: model.lora.rank=8"):
        resolve_lora(cfg.model.lora, str(tiny_model_dir))


def _lora(rank, alpha=16.0, targets=()):
    from rlhf_dist.config import LoraConfig

    return LoraConfig(rank=rank, alpha=alpha, target_modules=list(targets))


def test_resume_across_full_and_lora_refused():
    from rlhf_dist.models.lora import lora_signature

    check_resume({"algo": "grpo"}, _lora(0), "ck")
    check_resume({"lora_rank": 8}, _lora(8), "ck")  # a manifest from before alpha/targets were recorded
    check_resume({"lora": lora_signature(_lora(8, 32.0))}, _lora(8, 32.0), "ck")
    with pytest.raises(ConfigError, match="full fine-tuning run, but this run is LoRA .*Fix: model.lora.rank=0"):
        check_resume({"algo": "grpo"}, _lora(8), "ck")
    with pytest.raises(ConfigError, match="LoRA .* run, but this run is full fine-tuning.*model.lora.rank=8"):
        check_resume({"lora_rank": 8}, _lora(0), "ck")
    # same rank, another scale or other targets: other adapters, refused (DeepSpeed restores by position)
    with pytest.raises(ConfigError, match=r"Fix: model.lora.rank=8 model.lora.alpha=32.0 model.lora.target_modules=\[\]"):
        check_resume({"lora": lora_signature(_lora(8, 32.0))}, _lora(8, 16.0), "ck")
    with pytest.raises(ConfigError, match=r"model.lora.target_modules=\[q_proj\]"):
        check_resume({"lora": lora_signature(_lora(8, 16.0, ["q_proj"]))}, _lora(8, 16.0), "ck")


def test_merged_weights_under_hf_names_and_reference_is_the_base(tiny_model_dir):
    """W + scaling * B @ A under the base model's names gives the adapted model's outputs; with the
    adapters off the wrapped model is the base model."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    names = set(dict(base.named_parameters()))
    ids = torch.randint(0, 90, (2, 7))
    with torch.no_grad():
        base_logits = base(ids).logits
    model = add_adapters(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraSpec(4, 8.0, 0.0, ["q_proj", "up_proj"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)  # B = 0 at the start: make the adapter matter
        adapted = model(ids).logits
        with reference_off(model):
            reference = model(ids).logits
        layers = lora_layers(model)
        merged = {n: merged_weight(p, layers.get(n)) for n, p in base_params(model).items()}
    assert set(merged) == names and len(layers) == 2 * 2  # 2 layers x (q_proj, up_proj)
    torch.testing.assert_close(reference, base_logits, rtol=0, atol=0)
    assert (adapted - base_logits).abs().max() > 1e-2
    base.load_state_dict(merged, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(base(ids).logits, adapted, rtol=1e-5, atol=1e-5)


def test_an_adapter_dir_as_model_path_names_the_merged_model(tmp_path):
    from rlhf_dist.checkpoint import policy_model_dir

    final = tmp_path / "final"
    final.mkdir()
    (final / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds a LoRA adapter.*export_merged=true"):
        policy_model_dir(final)
    (final / "merged").mkdir()
    (final / "merged" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"model.path=.*merged \(the merged model"):
        policy_model_dir(final)
    assert policy_model_dir(final / "merged") == str(final / "merged")


def test_adapter_sync_refused_where_it_cannot_work():
    validate(compose_config(["model.lora.rank=8", "model.lora.sync=adapter"]))
    with pytest.raises(ConfigError, match=r"model.lora.sync is set but model.lora.rank=0"):
        validate(compose_config(["model.lora.sync=adapter"]))
    with pytest.raises(ConfigError, match=r"model.lora.sync='deltas': expected 'merged'.*Fix"):
        validate(compose_config(["model.lora.rank=8", "model.lora.sync=deltas"]))
    for override, named in (("rollout.tensor_parallel_size=2", "tensor_parallel_size=2"),
                            ("rollout.sync_transport=ipc", "sync_transport=ipc"),
                            ("rollout.sleep_level=2", "sleep_level=2")):
        with pytest.raises(ConfigError, match=rf"model.lora.sync=adapter with rollout.{named}.*Fix: model.lora.sync=merged"):
            validate(compose_config(["model.lora.rank=8", "model.lora.sync=adapter", override]))


def test_adapter_sync_falls_back_to_merged_for_a_model_vllm_serves_no_adapters_for(tiny_model_dir, tmp_path, capsys):
    from rlhf_dist.rl.launcher import lora_sync_mode
    from rlhf_dist.weights.adapter import vllm_max_rank

    adapter = compose_config(["model.lora.rank=8", "model.lora.sync=adapter"])
    assert lora_sync_mode(compose_config([]), str(tiny_model_dir)) is None
    assert lora_sync_mode(compose_config(["model.lora.rank=8"]), str(tiny_model_dir)) == "merged"
    assert lora_sync_mode(adapter, str(tiny_model_dir)) == "adapter"  # Qwen2: vLLM serves adapters
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    assert lora_sync_mode(adapter, str(gpt2)) == "merged"
    assert "vLLM serves no LoRA adapters for GPT2LMHeadModel" in capsys.readouterr().out
    assert [vllm_max_rank(r) for r in (1, 4, 8, 9, 320)] == [1, 8, 8, 16, 320]


def test_adapter_sync_refuses_an_adapter_with_parts_it_would_not_send(tiny_model_dir, tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "target_modules": ["q_proj"],
                                                              "bias": "lora_only"}))
    merged = compose_config(["model.lora.rank=8", f"model.lora.path={tmp_path}"])
    assert resolve_lora(merged.model.lora, str(tiny_model_dir)).target_modules == ["q_proj"]  # merged sends it all
    adapter = compose_config(["model.lora.rank=8", f"model.lora.path={tmp_path}", "model.lora.sync=adapter"])
    with pytest.raises(ConfigError, match=r"bias='lora_only'.*Fix: model.lora.sync=merged"):
        resolve_lora(adapter.model.lora, str(tiny_model_dir))
    with pytest.raises(ConfigError, match=r"rank <= 512"):
        validate(compose_config(["model.lora.rank=1024", "model.lora.sync=adapter"]))


def test_critic_lora_validated_and_resumed_only_into_its_kind(tiny_model_dir):
    validate(compose_config(["algo=ppo", "critic.lora.rank=8"]))
    with pytest.raises(ConfigError, match=r"critic.lora.rank=-2.*Fix: critic.lora.rank=8"):
        validate(compose_config(["critic.lora.rank=-2"]))
    with pytest.raises(ConfigError, match=r"critic.lora.target_modules is set but critic.lora.rank=0"):
        validate(compose_config(["critic.lora.target_modules=[q_proj]"]))
    cfg = compose_config(["critic.lora.rank=8", "critic.lora.target_modules=[c_attn]"])
    with pytest.raises(ConfigError, match=r"critic.lora.target_modules has \['c_attn'\]"):
        resolve_lora(cfg.critic.lora, str(tiny_model_dir), "critic.lora")
    from rlhf_dist.models.lora import lora_signature

    check_resume({"lora_rank": 0, "critic_lora": lora_signature(_lora(8))}, _lora(0), "ck", _lora(8))
    with pytest.raises(ConfigError, match=r"from a critic LoRA .* run, but this run is critic full fine-tuning"
                                          r".*Fix: critic.lora.rank=8"):
        check_resume({"critic_lora": lora_signature(_lora(8))}, _lora(0), "ck", _lora(0))
    with pytest.raises(ConfigError, match=r"critic.lora.rank=8 but algo.advantage=grpo uses no critic"):
        validate(compose_config(["critic.lora.rank=8"]))
