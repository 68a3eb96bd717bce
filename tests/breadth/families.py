"""Tiny random-weight transformers models, one per family, built from configs only (no downloads).

Each family gives the model, a batch of 4 samples and the loss the user's ``training_step`` would read
(``model(**batch).loss``): ``FAMILIES[name](seed)`` → ``(model, batch)``.
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB, BATCH, SEQ = 64, 4, 8


def _ids(g: torch.Generator) -> torch.Tensor:
    return torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)


def _causal(g):
    ids = _ids(g)
    return {"input_ids": ids, "labels": ids}


def _seqcls(g):
    return {"input_ids": _ids(g), "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
            "labels": torch.randint(0, 2, (BATCH,), generator=g)}


def _seq2seq(g):
    ids = _ids(g)
    return {"input_ids": ids, "labels": ids.flip(1)}


def _pixels(g, size: int = 32):
    return {"pixel_values": torch.randn(BATCH, 3, size, size, generator=g),
            "labels": torch.randint(0, 3, (BATCH,), generator=g)}


def _build(name: str) -> tuple[nn.Module, object]:
    import transformers as tf

    attn = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    drop = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if name == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)), _causal
    if name == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, num_key_value_heads=2,
                                                  max_position_embeddings=32, **attn)), _causal
    if name == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(vocab_size=VOCAB, num_key_value_heads=2, max_position_embeddings=32,
                                                  tie_word_embeddings=True, **attn)), _causal
    if name == "bloom":
        return tf.BloomForCausalLM(tf.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4,
                                                  hidden_dropout=0.0, attention_dropout=0.0)), _causal
    if name in ("mixtral", "mixtral_4_layers"):  # 4 layers: enough whole layers for a balanced 2-stage cut
        layers = dict(attn, num_hidden_layers=4) if name == "mixtral_4_layers" else attn
        return tf.MixtralForCausalLM(tf.MixtralConfig(vocab_size=VOCAB, num_key_value_heads=2, num_local_experts=4,
                                                      num_experts_per_tok=2, output_router_logits=True,
                                                      router_aux_loss_coef=0.02, max_position_embeddings=32,
                                                      **layers)), _causal
    if name == "gpt_neox":
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(vocab_size=VOCAB, max_position_embeddings=32,
                                                      hidden_dropout=0.0, attention_dropout=0.0, **attn)), _causal
    if name == "bert":
        return tf.BertForSequenceClassification(tf.BertConfig(vocab_size=VOCAB, max_position_embeddings=32,
                                                              num_labels=2, **attn, **drop)), _seqcls
    if name == "deberta_v2":
        return tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(
            vocab_size=VOCAB, max_position_embeddings=32, relative_attention=True, position_buckets=8,
            pos_att_type=["p2c", "c2p"], num_labels=2, **attn, **drop)), _seqcls
    if name == "t5":
        return tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                         num_decoder_layers=2, num_heads=4, dropout_rate=0.0,
                                                         relative_attention_num_buckets=8, decoder_start_token_id=0,
                                                         pad_token_id=0)), _seq2seq
    if name == "bart":
        return tf.BartForConditionalGeneration(tf.BartConfig(
            vocab_size=VOCAB, encoder_layers=2, decoder_layers=2, d_model=32, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, dropout=0.0, attention_dropout=0.0,
            activation_dropout=0.0, max_position_embeddings=32)), _seq2seq
    if name == "convnext":
        return tf.ConvNextForImageClassification(tf.ConvNextConfig(hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1],
                                                                   image_size=32, num_labels=3)), _pixels
    if name == "resnet":
        return tf.ResNetForImageClassification(tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32],
                                                               depths=[1, 1, 1, 1], layer_type="basic",
                                                               num_labels=3)), _pixels
    if name == "vit":
        return tf.ViTForImageClassification(tf.ViTConfig(image_size=16, patch_size=4, num_labels=3, **attn,
                                                         **drop)), lambda g: _pixels(g, 16)
    if name == "whisper":
        def audio(g):
            ids = _ids(g)
            return {"input_features": torch.randn(BATCH, 8, 16, generator=g), "labels": ids}
        return tf.WhisperForConditionalGeneration(tf.WhisperConfig(
            vocab_size=VOCAB, num_mel_bins=8, encoder_layers=2, decoder_layers=2, d_model=32,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
            max_source_positions=8, max_target_positions=16, dropout=0.0, attention_dropout=0.0,
            activation_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
            suppress_tokens=None, begin_suppress_tokens=None)), audio
    if name == "mamba":
        return tf.MambaForCausalLM(tf.MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=4, num_hidden_layers=2,
                                                  expand=2, conv_kernel=4, time_step_rank=4)), _causal
    raise ValueError(f"unknown family {name!r}")


FAMILY_NAMES = ("gpt2", "llama", "qwen2", "gpt_neox", "bloom", "mixtral", "bert", "deberta_v2", "t5", "bart",
                "convnext", "resnet", "vit", "whisper", "mamba")


def build(name: str, seed: int = 0) -> tuple[nn.Module, dict]:
    """The family's model (seeded weights, train mode) and a batch of ``BATCH`` samples."""
    torch.manual_seed(seed)
    model, make_batch = _build(name)
    return model, make_batch(torch.Generator().manual_seed(seed + 1))
