"""The tiny preset's conv image encoder (RAMConfig.image_encoder: conv): RAM's token contract, the config
that builds it, checkpoints that keep it, and the settings that refuse it."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from ram_model.checkpoint import from_pretrained, save_pretrained
from ram_model.conv_encoder import ConvImageEncoder, conv_blocks
from ram_model.ram import RAM, RAMConfig
from tasks.engine.config import ModelConfig


def test_tokens_follow_rams_layout_mean_first_then_the_grid():
    torch.manual_seed(0)
    enc = ConvImageEncoder((8, 16, 24)).eval()
    x = torch.randn(2, 3, 32, 32)
    out = enc(x)
    assert out.shape == (2, 1 + 8 * 8, 24)          # two pools: 32 -> 8, the last block keeps its grid
    assert torch.allclose(out[:, 0], out[:, 1:].mean(dim=1), atol=1e-6)
    grid = enc.features(x).flatten(2).transpose(1, 2)
    assert torch.equal(out[:, 1:], grid)             # tokens in row-major order
    with pytest.raises(ValueError, match="positive"):
        ConvImageEncoder(())


def test_conv_blocks_pool_after_every_block_unless_told():
    pools = lambda seq: sum(isinstance(m, torch.nn.MaxPool2d) for m in seq)   # noqa: E731
    assert pools(conv_blocks((4, 4, 4))) == 3 and pools(conv_blocks((4, 4, 4), pool_last=False)) == 2


def test_a_conv_ram_tags_trains_and_round_trips_through_its_checkpoint(tmp_path):
    torch.manual_seed(0)
    cfg = RAMConfig.tiny(num_tags=3, with_caption=False, max_pool_head=True, image_encoder="conv",
                         conv_channels=(8, 16, 16))
    model = RAM(cfg, tags=["a", "b", "c"])
    assert isinstance(model.visual_encoder, ConvImageEncoder) and model.image_proj.in_features == 16
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([[1.0, 0, 0]] * 4)
    loss = model.training_losses(x, y)["loss"]
    loss.backward()
    assert model.visual_encoder.features[0].weight.grad.abs().sum() > 0   # the encoder learns through the head
    model.eval()
    save_pretrained(model, tmp_path / "m")
    back = from_pretrained(tmp_path / "m")
    assert back.config.image_encoder == "conv" and back.config.conv_channels == (8, 16, 16)
    with torch.no_grad():
        assert torch.allclose(back(x), model(x), atol=1e-5)   # BatchNorm's running statistics travel too
    # a config.json of before this option (no such fields) still builds RAM's Swin
    old = RAMConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k not in ("image_encoder", "conv_channels")})
    assert old.image_encoder == "swin"


def test_the_settings_that_refuse_it():
    with pytest.raises(ValueError, match="image_encoder must be 'swin' or 'conv'"):
        RAMConfig.tiny(num_tags=2, image_encoder="vit")
    with pytest.raises(ValueError, match="conv_channels"):
        RAMConfig.tiny(num_tags=2, image_encoder="conv", conv_channels=(8, 0))
    with pytest.raises(ValidationError, match="tiny preset only"):
        ModelConfig(preset="ram", image_encoder="conv")
    assert ModelConfig(image_encoder="conv").image_encoder == "conv"


def test_models_built_from_config_use_it(tmp_path):
    from tasks.stages.train import _build_model

    built = _build_model(ModelConfig(with_caption=False, image_encoder="conv"), ["p", "q"], None, [])
    assert isinstance(built.visual_encoder, ConvImageEncoder)
    assert not isinstance(_build_model(ModelConfig(with_caption=False), ["p"], None, []).visual_encoder,
                          ConvImageEncoder)
