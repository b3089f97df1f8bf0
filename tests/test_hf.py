"""patch_model / unpatch_model and chunk-free training through HF models: the
patched model's loss and gradients equal the same weights run with eager
attention and the dense reference mask."""

import pytest
import torch

import unigist
from unigist import GistConfig
from unigist.data import GistCollator
from unigist.hf import get_gist_config, is_patched, patch_model, unpatch_model

from _hf_models import FAMILIES, VOCAB, dense_mask, reference_copy, tiny_model, tiny_tokenizer
from conftest import rel_err

CFG = GistConfig(ratio=3, window=12, num_sink=4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_loss_and_grads_match_dense_reference(family, seed, monkeypatch):
    model = tiny_model(family, seed=seed % 1000)
    cfg = patch_model(model, None, CFG)
    assert cfg.gist_token_id == VOCAB and model.get_input_embeddings().weight.shape[0] == VOCAB + 1
    ref = reference_copy(model)
    model.train()
    ref.train()

    collate = GistCollator(cfg, pad_token_id=0)
    lengths = [70, 53]  # different lengths: the shorter row is right-padded
    batch = collate([{"input_ids": torch.randint(0, VOCAB, (n,))} for n in lengths])
    n = batch["input_ids"].shape[1]
    assert n == 70 + 70 // 3

    calls = []
    real = unigist.hf.gist_attention
    monkeypatch.setattr(unigist.hf, "gist_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = model(**batch)
    assert len(calls) == 2  # every layer went through the unigist op
    out.loss.backward()

    ref_out = ref(**batch, attention_mask=dense_mask(n, cfg, batch=2))
    ref_out.loss.backward()

    assert torch.isfinite(out.loss)
    assert abs(out.loss.item() - ref_out.loss.item()) < 1e-5 * max(1.0, abs(ref_out.loss.item()))
    assert rel_err(out.logits, ref_out.logits) < 1e-5
    grads = dict(ref.named_parameters())
    checked = 0
    for name, p in model.named_parameters():
        g_ref = grads[name].grad
        assert p.grad is not None and g_ref is not None, name
        if g_ref.norm() > 0:
            assert rel_err(p.grad, g_ref) < 1e-4, name
            checked += 1
    assert checked >= 10


def test_mask_actually_matters(seed):
    """The patched forward differs from plain causal attention once N > window (the test above can fail)."""
    model = tiny_model("llama", seed=seed % 1000)
    cfg = patch_model(model, None, CFG)
    ref = reference_copy(model)
    ids = unigist.layout.insert_gists(torch.randint(0, VOCAB, (1, 60)), cfg)
    with torch.no_grad():
        a = model(input_ids=ids["input_ids"], position_ids=ids["position_ids"]).logits
        b = ref(input_ids=ids["input_ids"], position_ids=ids["position_ids"]).logits  # causal, no gist mask
    assert rel_err(a, b) > 1e-3


def test_patch_with_tokenizer_adds_token_and_mean_embedding():
    tok = tiny_tokenizer()
    n_before = len(tok)
    model = tiny_model("llama", vocab=n_before)
    emb_before = model.get_input_embeddings().weight.detach().clone()
    head_before = model.get_output_embeddings().weight.detach().clone()
    cfg = patch_model(model, tok, GistConfig(ratio=2, window=8, num_sink=2))
    assert len(tok) == n_before + 1
    assert tok.convert_tokens_to_ids("<|gist|>") == cfg.gist_token_id == n_before
    assert tok.encode("cat <|gist|> dog", add_special_tokens=False)[1] == cfg.gist_token_id
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == n_before + 1
    assert torch.equal(emb[:n_before], emb_before)
    torch.testing.assert_close(emb[cfg.gist_token_id], emb_before.mean(0))
    torch.testing.assert_close(model.get_output_embeddings().weight[cfg.gist_token_id], head_before.mean(0))
    assert model.config._attn_implementation == "unigist"
    assert get_gist_config(model) == cfg and model.config.unigist_config["gist_token_id"] == cfg.gist_token_id

    # Patching again (e.g. a saved fine-tuned model) reuses the token and keeps its trained row.
    with torch.no_grad():
        model.get_input_embeddings().weight[cfg.gist_token_id] = 3.0
    unpatch_model(model)
    cfg2 = patch_model(model, tok, GistConfig(ratio=2, window=8, num_sink=2))
    assert cfg2.gist_token_id == cfg.gist_token_id and len(tok) == n_before + 1
    assert torch.all(model.get_input_embeddings().weight[cfg.gist_token_id] == 3.0)


def test_unpatch_restores_attention():
    model = tiny_model("qwen2")
    before = model.config._attn_implementation
    patch_model(model, None, CFG)
    assert is_patched(model) and model.config._attn_implementation == "unigist"
    unpatch_model(model)
    assert not is_patched(model)
    assert model.config._attn_implementation == before
    assert not hasattr(model.config, "unigist_config")
    ids = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        model(input_ids=ids)  # runs with the original attention again
    with pytest.raises(ValueError, match="not patched"):
        unpatch_model(model)


def test_unsupported_models_raise():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="not supported"):
        patch_model(gpt2, None, CFG)
    mistral_swa = tiny_model("mistral", sliding_window=8)
    with pytest.raises(ValueError, match="sliding-window"):
        patch_model(mistral_swa, None, GistConfig(ratio=2, window=16, num_sink=2))
    patch_model(mistral_swa, None, GistConfig(ratio=2, window=8, num_sink=2))  # window <= sliding window: fine
    qwen_swa = tiny_model("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0)
    with pytest.raises(ValueError, match="sliding-window"):
        patch_model(qwen_swa, None, CFG)
    dropout = tiny_model("llama", attention_dropout=0.1)
    with pytest.raises(ValueError, match="attention_dropout"):
        patch_model(dropout, None, CFG)
    with pytest.raises(TypeError):
        patch_model(tiny_model("llama"), None, {"ratio": 4})


def test_unpatched_module_and_left_padding_raise():
    model = tiny_model("llama")
    cfg = patch_model(model, None, CFG)
    batch = GistCollator(cfg, return_attention_mask=True)([list(range(1, 30)), list(range(1, 20))])
    assert batch["attention_mask"][1, -1] == 0
    with torch.no_grad():
        model(**batch)  # right padding is fine
        left = batch["attention_mask"].flip(-1)
        with pytest.raises(ValueError, match="right padding"):
            model(input_ids=batch["input_ids"], attention_mask=left)
    with pytest.raises(RuntimeError, match="patch_model"):
        unigist.hf.unigist_attention_forward(
            torch.nn.Linear(1, 1), *(torch.randn(1, 2, 3, 8) for _ in range(3)), None
        )


@pytest.mark.cuda
def test_cuda_head_dim_checked():
    model = tiny_model("llama").cuda()  # head_dim 16
    with pytest.raises(ValueError, match="head_dim"):
        patch_model(model, None, CFG)


@pytest.mark.cuda
def test_cuda_autocast_training_uses_the_kernel(seed, monkeypatch):
    """Under bf16 autocast RoPE hands float32 q/k to the attention function; it must
    still run the CUDA kernel (in bf16), not the dense-mask fallback, and match the
    float32 dense reference within bf16 tolerance."""
    model = tiny_model("llama", seed=seed % 1000, hidden_size=256, num_attention_heads=4).cuda()  # head_dim 64
    cfg = patch_model(model, None, CFG)
    ref = reference_copy(model)
    batch = {k: v.cuda() for k, v in GistCollator(cfg)([torch.randint(0, VOCAB, (90,))]).items()}
    calls = []
    real = unigist.hf.gist_attention
    monkeypatch.setattr(unigist.hf, "gist_attention", lambda *a, **k: calls.append(a[0].dtype) or real(*a, **k))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(**batch).logits
    assert calls == [torch.bfloat16, torch.bfloat16]
    ref_logits = ref(**batch, attention_mask=dense_mask(batch["input_ids"].shape[1], cfg).cuda()).logits
    assert rel_err(logits.float(), ref_logits) < 5e-2  # whole model under bf16 autocast


def test_collator_layout():
    cfg = GistConfig(ratio=2, window=8, num_sink=1, gist_token_id=99, gist_predicts_next=True)
    collate = GistCollator(cfg, pad_token_id=7, pad_to_multiple_of=4)
    examples = [{"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, 4, 5]}, [10, 11]]
    out = collate(examples)
    assert out["input_ids"].tolist() == [[1, 2, 99, 3, 4, 99, 5, 7], [10, 11, 99, 7, 7, 7, 7, 7]]
    assert out["labels"].tolist() == [[-100, 2, -100, 3, 4, -100, 5, -100], [10, 11, -100, -100, -100, -100, -100, -100]]
    # the memory-only gist (the default): the label after a gist moves onto the gist's slot, so the
    # raw token before the gist (shifted by one in the loss) predicts it; the gist's output is untrained
    out = GistCollator(cfg.replace(gist_predicts_next=False), pad_token_id=7, pad_to_multiple_of=4)(examples)
    assert out["input_ids"].tolist() == [[1, 2, 99, 3, 4, 99, 5, 7], [10, 11, 99, 7, 7, 7, 7, 7]]
    assert out["labels"].tolist() == [[-100, 2, 3, -100, 4, 5, -100, -100], [10, 11, -100, -100, -100, -100, -100, -100]]
    assert out["position_ids"].tolist() == [list(range(8))] * 2
    assert "attention_mask" not in out
    with pytest.raises(ValueError, match="gist_token_id"):
        GistCollator(GistConfig())
    assert GistCollator(cfg, max_length=3)([[1, 2, 3, 4]])["input_ids"].tolist() == [[1, 2, 99, 3]]


def test_trainer_one_step_runs():
    """The collator plugs into transformers.Trainer: one chunk-free step, loss finite."""
    pytest.importorskip("accelerate")  # transformers.Trainer needs it
    from transformers import Trainer, TrainingArguments

    model = tiny_model("llama")
    cfg = patch_model(model, None, CFG)
    data = [{"input_ids": torch.randint(0, VOCAB, (40,)).tolist()} for _ in range(4)]
    args = TrainingArguments(
        output_dir="/tmp/unigist_trainer_test", per_device_train_batch_size=2, max_steps=2, report_to=[],
        logging_steps=1, save_strategy="no", use_cpu=True, learning_rate=1e-3,
    )
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=GistCollator(cfg))
    result = trainer.train()
    assert result.training_loss == result.training_loss  # not NaN
    assert not torch.equal(before, model.model.layers[0].self_attn.q_proj.weight)


def test_explicit_key_positions_kwarg_matches_kernel_path():
    """A `gist_key_positions` forward kwarg takes the positions-mask (SDPA) path; same result."""
    model = tiny_model("qwen2")
    cfg = patch_model(model, None, CFG)
    x = unigist.layout.insert_gists(torch.randint(0, VOCAB, (1, 50)), cfg)
    n = x["input_ids"].shape[1]
    with torch.no_grad():
        a = model(input_ids=x["input_ids"], position_ids=x["position_ids"]).logits
        b = model(input_ids=x["input_ids"], position_ids=x["position_ids"], gist_key_positions=torch.arange(n)).logits
    assert rel_err(b, a) < 1e-5
