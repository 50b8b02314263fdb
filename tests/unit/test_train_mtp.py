"""Training an MTP draft layer for a frozen tiny model (services/train/mtp_trainer.py): a few
steps lower its t+2 loss and move its gate's bias, the main model's weights stay as they were,
and the exported layer loads with load_model(mtp=True) and computes what was trained, while
the checkpoint's other tensors stay byte for byte."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from services.model.config import ModelConfig
from services.model.loader import load_model
from services.model.tokenizer import Tokenizer
from services.train.bpe import train_tokenizer, write_tokenizer_files
from services.train.data import Work
from services.train.mtp_export import export_mtp
from services.train.mtp_report import held_out_prompts, measure_speculation, write_card
from services.train.mtp_trainer import (
    MTPTrainConfig,
    frozen_model,
    held_out,
    init_mtp,
    segment_batch,
    train_mtp,
)
from services.train.recipe import TINY_TRAIN, TrainConfig
from services.train.trainer import train
from services.train.windows import encode_works, eval_windows
from tests.unit.test_train_smoke import VERSE

TC = MTPTrainConfig(steps=10, batch_size=4, seq_len=24, lr=1e-2, warmup_steps=2, eval_every=5,
                    eval_windows=4, context=8, threads=1)


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    """A tiny main model trained a few steps (so its hidden states mean something)."""
    torch.set_num_threads(1)
    train_works = [Work("romeo", VERSE * 12), Work("sonnets", VERSE[::-1] * 6)]
    held = [Work("held", VERSE * 3)]
    backend = train_tokenizer(train_works, TINY_TRAIN["vocab_size"])
    tok_dir = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(tok_dir, backend)
    tok = Tokenizer.from_dir(tok_dir)
    stream, held_stream = encode_works(tok, train_works), encode_works(tok, held)
    out = tmp_path_factory.mktemp("ckpt")
    main = TrainConfig(steps=8, batch_size=4, seq_len=24, lr=1e-2, warmup_steps=2, eval_every=8,
                       eval_windows=2, checkpoint_every_s=1e9, threads=1)
    train(TINY_TRAIN, main, stream, held_stream, backend, tmp_path_factory.mktemp("work"), out,
          progress=False)
    return out, stream, held_stream


def test_segments_attend_from_their_own_start():
    batch = segment_batch(2, 10, 4)
    assert batch.query_lens == (4, 4, 2, 4, 4, 2)
    assert batch.positions[:10].tolist() == list(range(10))
    assert batch.context_slots[1].tolist() == [4, 5, 6, 7]
    assert batch.context_slots[3].tolist() == [10, 11, 12, 13]
    assert torch.equal(batch.write_slots, torch.arange(20))


def test_init_copies_the_last_layer_and_shares_embedding_and_head(trained_dir):
    out, _, _ = trained_dir
    model = frozen_model(out)
    mtp = init_mtp(model)
    last = model.layers[-1]
    assert torch.equal(mtp.mlp.experts.gate_up, last.mlp.experts.gate_up)
    assert torch.equal(mtp.self_attn.kv_a_proj_with_mqa.weight,
                       last.self_attn.kv_a_proj_with_mqa.weight)
    assert mtp.embed_tokens.weight is model.model.embed_tokens.weight
    assert mtp.shared_head.head.weight is model.lm_head.weight
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("mtp.") for n in trainable)
    assert "mtp.embed_tokens.weight" not in trainable
    assert not any(n.endswith("e_score_correction_bias") for n in trainable)


def test_training_lowers_the_mtp_loss_and_exports_a_loadable_layer(trained_dir):
    out, stream, held_stream = trained_dir
    torch.set_num_threads(1)
    model = frozen_model(out)
    main_before = {k: v.clone() for k, v in model.state_dict().items()}
    init_mtp(model)
    bias_before = model.mtp.mlp.gate.e_score_correction_bias.clone()
    result = train_mtp(model, TC, stream, held_stream, progress=False)
    assert result.step == TC.steps and [m["step"] for m in result.metrics] == [0, 5, 10]
    first, last = result.metrics[0], result.metrics[-1]
    assert last["mtp"] < first["mtp"] and result.metrics[2]["train_loss"] < \
        result.metrics[1]["train_loss"]
    assert last["main"] == first["main"]
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in main_before.items())  # main model frozen
    assert not torch.equal(model.mtp.mlp.gate.e_score_correction_bias, bias_before)

    tensors_before = load_file(out / "model.safetensors")
    export_mtp(model, out)
    tensors = load_file(out / "model.safetensors")
    for k, v in tensors_before.items():  # every main tensor byte for byte
        assert v.dtype == tensors[k].dtype and torch.equal(v.view(torch.uint8),
                                                           tensors[k].view(torch.uint8)), k
    n = model.cfg.num_hidden_layers
    added = set(tensors) - set(tensors_before)
    assert added and all(k.startswith(f"model.layers.{n}.") for k in added)
    assert f"model.layers.{n}.embed_tokens.weight" not in added  # shared with the main model
    assert f"model.layers.{n}.mlp.experts.0.gate_proj.weight" in added
    assert tensors[f"model.layers.{n}.mlp.gate.weight"].dtype == torch.float32
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert ModelConfig.from_dir(out).num_nextn_predict_layers == 1

    assert load_model(out).mtp is None  # the main model loads as before
    loaded = load_model(out, mtp=True)
    trained = model.mtp.state_dict()
    for k, v in loaded.mtp.state_dict().items():
        assert torch.equal(v, trained[k]), k  # fp32 checkpoint: exact
    windows = eval_windows(held_stream, TC.seq_len)[:3]
    a = held_out(model, windows, 2, TC.context)
    b = held_out(loaded, windows, 2, TC.context)
    assert a == pytest.approx(b, abs=1e-5)

    prompts = held_out_prompts(held_stream, 3, 5)
    assert len(prompts) == 3 and all(len(p) == 6 and p[0] == held_stream.bos_id for p in prompts)
    spec = measure_speculation(out, prompts, 8)  # raises if the draft changed the output
    assert spec["outputs_identical"] and spec["drafts_proposed"] > 0
    summary = {"layer": n, "steps": result.step, "train_minutes": 0.0, "parameters": 1,
               "held_out": {**b, "windows": 3, "works": ["held"]}, "speculation": spec,
               "train_config": TC.to_dict(), "command": "python -m services.train.mtp_trainer",
               "safetensors_mb": 1.0}
    (out / "README.md").write_text("# card\n\n## Retrain\n\nx\n")
    write_card(out, summary)
    write_card(out, summary)  # replaces its section
    card = (out / "README.md").read_text()
    assert card.count("## MTP draft layer") == 1 and card.startswith("# card")
    assert json.loads((out / "train_summary.json").read_text())["mtp"]["steps"] == TC.steps
