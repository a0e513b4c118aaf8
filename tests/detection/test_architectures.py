"""Real architectures (tiny random-init configs, nothing downloaded): every attention call made at
run time is found as a rewritable site, and the exact rewrite reproduces the model."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn

import attnopt

from .support import assert_gradients_close, assert_outputs_close, count_attention_calls, gradients

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.slow  # about 40 s: 22 real architectures, each captured twice

HF_IMPLEMENTATIONS = ("eager", "sdpa")


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A tiny model, its inputs, and how many attention calls one forward makes."""

    build: Callable[[], tuple[nn.Module, tuple, dict]]
    attention_calls: int
    no_grad: bool = False
    shape: dict = dataclasses.field(default_factory=dict)  # expected subset of every site's shape

    def make(self) -> tuple[nn.Module, tuple, dict]:
        torch.manual_seed(0)
        model, args, kwargs = self.build()
        return model.eval(), args, kwargs


def token_ids(length: int = 8) -> torch.Tensor:
    return torch.randint(0, 100, (2, length))


def padding_mask(length: int = 8) -> torch.Tensor:
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, -2:] = 0
    return mask


def images(size: int = 16) -> torch.Tensor:
    return torch.randn(2, 3, size, size)


def bert(impl):
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, attn_implementation=impl,
    )
    return transformers.BertModel(config), (token_ids(),), {"attention_mask": padding_mask()}


def gpt2(impl, dropout=0.1):
    config = transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0,
        attn_pdrop=dropout, resid_pdrop=dropout, embd_pdrop=dropout, attn_implementation=impl,
    )
    return transformers.GPT2Model(config), (token_ids(),), {"attention_mask": padding_mask()}


def llama(impl):
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=32, attn_implementation=impl,
    )
    return transformers.LlamaModel(config), (token_ids(),), {}


def t5(impl):
    config = transformers.T5Config(
        vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2,
        attn_implementation=impl,
    )
    ids = token_ids()
    return transformers.T5Model(config), (ids,), {"attention_mask": padding_mask(), "decoder_input_ids": ids[:, :5]}


def vit(impl, dropout=0.0):
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, attn_implementation=impl,
    )
    return transformers.ViTModel(config), (images(),), {}


def clip_vision(impl):
    config = transformers.CLIPVisionConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        attn_implementation=impl,
    )
    return transformers.CLIPVisionModel(config), (images(),), {}


def swin(impl):
    config = transformers.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[2, 1], num_heads=[2, 2], window_size=4, attn_implementation=impl,
    )
    return transformers.SwinModel(config), (torch.randn(1, 3, 32, 32),), {}


def dinov2(impl):
    config = transformers.Dinov2Config(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        attn_implementation=impl,
    )
    return transformers.Dinov2Model(config), (images(),), {}


def torch_encoder():
    layer = nn.TransformerEncoderLayer(32, 2, dim_feedforward=64, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    return encoder, (torch.randn(2, 8, 32),), {"src_key_padding_mask": padding_mask() == 0}


def torch_mha():
    return nn.MultiheadAttention(32, 2, batch_first=True), (torch.randn(2, 8, 32),) * 3, {"need_weights": False}


def dit():
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10, norm_num_groups=32,
    )
    return model, (torch.randn(1, 4, 8, 8),), {"timestep": torch.tensor([3]), "class_labels": torch.tensor([1])}


def unet(processor=None):
    model = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )
    if processor is not None:
        model.set_attn_processor(processor)
    return model, (torch.randn(1, 4, 8, 8), torch.tensor([5])), {"encoder_hidden_states": torch.randn(1, 6, 32)}


def unet_baddbmm():
    from diffusers.models.attention_processor import AttnProcessor

    return unet(AttnProcessor())


ARCHITECTURES: dict[str, Architecture] = {
    **{f"bert-{impl}": Architecture(lambda impl=impl: bert(impl), 2) for impl in HF_IMPLEMENTATIONS},
    **{f"gpt2-{impl}": Architecture(lambda impl=impl: gpt2(impl), 2) for impl in HF_IMPLEMENTATIONS},
    **{f"llama-gqa-{impl}": Architecture(lambda impl=impl: llama(impl), 2, shape={"H": 4, "Hkv": 2}) for impl in HF_IMPLEMENTATIONS},
    **{f"t5-{impl}": Architecture(lambda impl=impl: t5(impl), 3) for impl in HF_IMPLEMENTATIONS},
    **{f"vit-{impl}": Architecture(lambda impl=impl: vit(impl), 2) for impl in HF_IMPLEMENTATIONS},
    **{f"clip-vision-{impl}": Architecture(lambda impl=impl: clip_vision(impl), 2) for impl in HF_IMPLEMENTATIONS},
    **{f"swin-{impl}": Architecture(lambda impl=impl: swin(impl), 3) for impl in HF_IMPLEMENTATIONS},
    **{f"dinov2-{impl}": Architecture(lambda impl=impl: dinov2(impl), 2) for impl in HF_IMPLEMENTATIONS},
    "torch-transformer-encoder-fast-path": Architecture(torch_encoder, 2, no_grad=True),
    "torch-transformer-encoder": Architecture(torch_encoder, 2),
    "torch-multihead-attention": Architecture(torch_mha, 1),
    "diffusers-dit": Architecture(dit, 2),
    "diffusers-unet": Architecture(unet, 8),
    "diffusers-unet-baddbmm-processor": Architecture(unet_baddbmm, 8),
}


def grad_mode(architecture: Architecture):
    return torch.no_grad() if architecture.no_grad else contextlib.nullcontext()


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_tiny_config_makes_the_expected_number_of_attention_calls(name):
    """Pins the ground truth (attention_calls) the other tests compare against."""
    architecture = ARCHITECTURES[name]
    model, args, kwargs = architecture.make()
    counts = count_attention_calls(model, args, kwargs)
    assert sum(counts.values()) == architecture.attention_calls, dict(counts)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_inspect_finds_every_attention_call_as_a_rewritable_site(name):
    architecture = ARCHITECTURES[name]
    model, args, kwargs = architecture.make()
    ground_truth = architecture.attention_calls
    with grad_mode(architecture):
        report = attnopt.inspect(model, args, kwargs)
    assert len(report.sites) == ground_truth, str(report)
    assert len({site.id for site in report.sites}) == ground_truth
    for site in report.sites:
        assert site.rewritable, f"{site.module}: {site.reason}"
        for key, value in architecture.shape.items():
            assert site.shape[key] == value, f"{site.module}: shape[{key}]"


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_exact_rewrite_reproduces_the_architecture(name):
    architecture = ARCHITECTURES[name]
    model, args, kwargs = architecture.make()
    ground_truth = architecture.attention_calls
    with grad_mode(architecture):
        expected = model(*args, **kwargs)
        rewritten = attnopt.rewrite(model, "exact", args=args, kwargs=kwargs)
        actual = rewritten(*args, **kwargs)
    assert_outputs_close(actual, expected)
    sites = attnopt.report_of(rewritten).sites
    assert len(sites) == ground_truth
    assert all(site.decision is not None and site.decision.variant == "exact" for site in sites)


GRADIENT_MODELS = {
    "gpt2-eager": lambda: gpt2("eager", dropout=0.0),
    "vit-sdpa": lambda: vit("sdpa", dropout=0.0),
}


@pytest.mark.parametrize("name", GRADIENT_MODELS)
def test_exact_rewrite_gives_equal_gradients_in_training_mode(name):
    torch.manual_seed(0)
    model, args, kwargs = GRADIENT_MODELS[name]()
    model.train()
    expected = gradients(model, args, kwargs)
    rewritten = attnopt.rewrite(model, "exact", args=args, kwargs=kwargs)
    actual = gradients(rewritten, args, kwargs)
    assert len(expected) > 10
    assert_gradients_close(actual, expected)
    sites = attnopt.report_of(rewritten).sites  # the gradients are the exact op's, not the original's
    assert set(collections.Counter(site.graph for site in sites).values()) == {2}, str(attnopt.report_of(rewritten))
    assert all(site.decision is not None and site.decision.variant == "exact" for site in sites)
