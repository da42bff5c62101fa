"""Text in place of token ids, padded encode_batch, per-layer helpers indexed by layer id."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import workbench as wb
from workbench.trace import ByLayer

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "data" / "scout-mini"
pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def tok():
    return wb.Tokenizer.from_pretrained(BUNDLED)


@pytest.fixture(scope="module")
def model():
    return wb.load(BUNDLED)


def test_encode_batch_pads_right_and_left(tok):
    texts = ["def f(x):", "a much longer piece of text than the first", "x"]
    rows = tok.encode_batch(texts)
    ids, mask = tok.encode_batch(texts, pad=True)
    T = max(map(len, rows))
    assert ids.shape == mask.shape == (3, T) and ids.dtype == mask.dtype == np.int64
    for b, r in enumerate(rows):
        assert ids[b, :len(r)].tolist() == r and (ids[b, len(r):] == tok.pad_id).all()
        assert mask[b].tolist() == [1] * len(r) + [0] * (T - len(r))
    left = tok.encode_batch(texts, pad=True, padding_side="left")
    for b, r in enumerate(rows):
        assert left.input_ids[b, T - len(r):].tolist() == r
        assert left.attention_mask[b].sum() == len(r) and left.attention_mask[b, -1] == 1
    with pytest.raises(ValueError, match="padding_side='middle'"):
        tok.encode_batch(texts, pad=True, padding_side="middle")
    with pytest.raises(TypeError, match="use encode"):
        tok.encode_batch("one text", pad=True)


def test_run_takes_text_when_the_model_knows_its_tokenizer(model, tok):
    text = "def read(path):\n    return open(path).read()"
    out = model.run(text, capture="*.moe.topk_indices")
    ref = model.run(tok.encode(text), capture="*.moe.topk_indices")
    assert np.array_equal(out.logits, ref.logits)
    assert out.trace.input_ids.tolist() == [tok.encode(text)]
    # a list of texts is a right-padded batch: each row as the text alone
    batch = model.run([text, "short"], capture="*.moe.topk_indices")
    assert batch.trace.attention_mask is not None and batch.trace.attention_mask[1, -1] == 0
    n = len(tok.encode("short"))
    alone = model.run("short")
    assert np.abs(batch.logits[1, :n] - alone.logits[0]).max() <= 2e-4 * \
        np.abs(alone.logits).max()
    gen = model.generate(["hello", "a longer prompt here"], 3, temperature=0)
    assert gen.trace.attention_mask[0, 0] == 0  # text prompts are padded on the left
    assert gen.new_tokens.shape == (2, 3)


def test_text_without_tokenizer_says_encode_first(tmp_path, model):
    from workbench.random_weights import write_random_checkpoint
    cfg = wb.ModelConfig.tiny(vocab_size=model.config.vocab_size)
    bare = wb.load(write_random_checkpoint(tmp_path, cfg, seed=0))
    assert bare.tokenizer is None
    with pytest.raises(wb.InputError, match="encode first with wb.Tokenizer"):
        bare.run("some text")
    with pytest.raises(wb.InputError, match="encode first with wb.Tokenizer"):
        bare.generate(["a", "b"], 2)
    bare.tokenizer = model.tokenizer  # assigning one makes text work
    assert bare.run("some text").logits.shape[1] == len(model.tokenizer.encode("some text"))
    with pytest.raises(wb.InputError, match="attention_mask is for token ids"):
        model.run("text", attention_mask=[1, 1])


def _maverick_trace(B: int = 2, T: int = 5) -> wb.Trace:
    """A synthetic trace of a Maverick-shaped model: MoE on odd layers only."""
    rng = np.random.default_rng(0)
    arrays = {f"layers.{i}.moe.topk_indices": rng.integers(0, 128, (B, T, 1)).astype(np.int32)
              for i in (1, 3, 5, 7)}
    return wb.Trace(arrays, np.zeros((B, T), np.int64), {"config": {"experts": 128}})


def test_top1_indexes_by_layer_id():
    t = _maverick_trace()
    top = t.top1()
    assert isinstance(top, ByLayer) and top.layers == [1, 3, 5, 7] and len(top) == 4
    assert np.array_equal(top[3], t["layers.3.moe.topk_indices"][..., 0])
    assert top[5, 1, 2] == t["layers.5.moe.topk_indices"][1, 2, 0]
    assert np.asarray(top).shape == (4, 2, 5) and top.shape == (4, 2, 5)
    assert np.array_equal(np.asarray(top)[1], top[3])  # stacked in layer order
    assert dict(top.items()).keys() == {1, 3, 5, 7}
    with pytest.raises(KeyError, match=r"layer 2 has no captured routing.*\[1, 3, 5, 7\]"):
        top[2]
    with pytest.raises(KeyError, match="index by layer id"):
        top["3"]
