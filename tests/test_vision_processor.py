"""wb.ImageProcessor / wb.Processor: Llama 4's tiling and prompt expansion.

transformers' ``Llama4ImageProcessor`` needs torchvision, which has no build for the pinned
torch here; its tiling rules are checked on the examples its docstrings give, and the token
expansion against ``Llama4Processor._prompt_split_image`` itself.
"""

from __future__ import annotations

import numpy as np
import pytest

import workbench as wb
from workbench.vision.processor import (
    best_fit,
    fit_without_distortion,
    image_prompt,
    supported_resolutions,
)


def test_tiling_rules_match_transformers_examples():
    assert best_fit((200, 300), [(224, 672), (672, 224), (224, 448), (448, 224),
                                 (224, 224)]) == (224, 448)
    assert fit_without_distortion((200, 300), (450, 200)) == (133, 200) or \
        fit_without_distortion((200, 300), (450, 200)) == (134, 200)
    assert fit_without_distortion((800, 600), (450, 1300)) == (450, 337) or \
        fit_without_distortion((800, 600), (450, 1300)) == (450, 338)
    assert sorted(supported_resolutions(4, 224)) == sorted(
        [(224, 896), (448, 448), (224, 224), (896, 224), (224, 672), (672, 224), (224, 448),
         (448, 224)])


@pytest.mark.parametrize("aspect", [(1, 1), (1, 2), (2, 3), (3, 1)])
def test_prompt_expansion_matches_llama4_processor(aspect):
    from transformers.models.llama4.processing_llama4 import Llama4Processor
    assert "".join(image_prompt(aspect, 144)) == Llama4Processor._prompt_split_image(
        None, aspect, 144)


def test_tiles_global_tile_and_normalisation():
    ip = wb.ImageProcessor(size=56, max_patches=4)
    wide = np.full((50, 200, 3), 255, np.uint8)  # white, 4:1 -> a 1x4 canvas
    out = ip([wide, np.zeros((40, 40), np.uint8)])
    assert out["aspect_ratios"].tolist() == [[1, 4], [1, 1]]
    pv = out["pixel_values"]
    assert pv.shape == (4 + 1 + 1, 3, 56, 56) and pv.dtype == np.float32
    # never upscaled beyond a tile: 50x200 white on a 56x224 canvas, padded right and below
    assert pv[:3, :, :50].min() == 1.0 and pv[3, :, :50, :32].min() == 1.0  # (1 - 0.5) / 0.5
    assert pv[0, :, 50:].max() == -1.0 and pv[3, :, :, 32:].max() == -1.0  # zero padding
    assert pv[5].max() == -1.0  # the black image: one tile, no global tile
    with pytest.raises(wb.VisionError, match="an image must be"):
        ip(np.zeros((3, 4, 5, 6)))


def test_processor_expands_markers(tmp_path):
    from tokenizers import Tokenizer as HFTok
    from tokenizers.models import WordLevel

    from workbench.config import ModelConfig
    from workbench.vision.processor import IMAGE_TOKENS, Processor
    vocab = {"[UNK]": 0, "a": 1, "b": 2, **{t: 10 + i for i, t in enumerate(IMAGE_TOKENS)}}
    tok = HFTok(WordLevel(vocab, unk_token="[UNK]"))
    from tokenizers.pre_tokenizers import Whitespace
    tok.pre_tokenizer = Whitespace()
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=128, image_size=28, patch_size=14, vision_output_dim=32,
                  projector_input_dim=32, projector_output_dim=32)
    cfg = ModelConfig.tiny(multimodal=True, extra={"vision_config": vision,
                                                   "image_token_index": 13,
                                                   "boi_token_index": 10, "eoi_token_index": 11})
    proc = Processor(tok, wb.ImageProcessor(size=28, max_patches=2), cfg)
    ids, pv = proc("a <|image|> b", [np.zeros((28, 56, 3), np.uint8)], bos=False)
    # 1x2 tiles + global, 1 placeholder per tile
    assert ids.tolist() == [[1, 10, 13, 14, 13, 15, 12, 13, 11, 2]]
    assert pv.shape == (3, 3, 28, 28)
    with pytest.raises(wb.VisionError, match="1 <\\|image\\|> marker"):
        proc("a <|image|> b", [])
