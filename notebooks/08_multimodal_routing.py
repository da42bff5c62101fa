# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 08 · Routing by modality: image patches and text in one set of experts
#
# Llama 4 is *early fusion*: an image becomes a run of `<|patch|>` placeholder tokens in the
# prompt, and the vision path (a ViT over 14×14-pixel patches, pixel shuffle, an MLP adapter
# and a linear projector) writes one feature vector into each placeholder's embedding. From
# there on image and text tokens share one backbone and **one set of experts**. So: do image
# tokens go to different experts than text, and in which layers?
#
# The model here is `data/scout-mini-vision`: the bundled text model with a small vision tower
# trained by `workbench train --multimodal` on generated images of coloured shapes and their
# captions (its model card, `data/scout-mini-vision/README.md`, has the numbers).

# %%
# %matplotlib inline
import json

import matplotlib.pyplot as plt
import numpy as np

import workbench as wb
from workbench import plots
from workbench.train import BUNDLED_VISION_MODEL as MODEL

model = wb.load(MODEL, backend="torch")
processor = wb.Processor.from_pretrained(MODEL)  # tokenizer + image processor + placeholders
tok = processor.tokenizer
model

# %% [markdown]
# ## An image through the processor
#
# The processor resizes and normalises the image into tiles (one 112×112 tile for this model;
# Scout uses up to 16 tiles of 336×336 plus a global one) and expands `<|image|>` in the text
# into `<|image_start|>`, `<|image|>`, one `<|patch|>` per projected feature, `<|image_end|>`.

# %%
from workbench.vision.train import sample

image, caption = sample(np.random.default_rng(7))  # (H, W, 3) in [0, 1] and its caption
ids, pixel_values = processor("<|image|>", [image])
print("caption:", caption)
print("input_ids", ids.shape, "pixel_values", pixel_values.shape)
print(" ".join(tok.id_to_token(int(i)) for i in ids[0][:6]), "...",
      tok.id_to_token(int(ids[0, -1])))
plt.figure(figsize=(2.5, 2.5))
plt.imshow(image)
plt.axis("off")
plt.show()

# %% [markdown]
# `model.run` takes the pixel values beside the ids. The vision hooks are per tile
# (`vision.embed`, `vision.layers.{j}.resid_post`, `vision.layers.{j}.attn.pattern`,
# `vision.adapter_out`, `vision.projected`), and `token_modality` marks every position as text
# (0), image patch (1) or image special token (2), so any analysis can split by modality.

# %%
out = model.run(ids, pixel_values=pixel_values,
                capture=["vision.*", "*.moe.topk_indices", "token_modality"])
for name in sorted(n for n in out.trace if n.startswith("vision.")):
    print(f"{name:32s} {out.trace[name].shape}")
print("token_modality", out.trace["token_modality"][0])

# %% [markdown]
# ## The model describes the image
#
# Greedy generation after the image (the training format: the caption follows `<|image_end|>`).
# This small model reads the colour almost always and the shape often, but rarely the layout
# (its model card gives the rates), so expect captions that are right in part.

# %%
gen = model.generate(ids, 16, temperature=0, pixel_values=pixel_values, stop_ids=[tok.eos_id])
print("generated:", tok.decode(gen.new_tokens[0]).strip())
print("true:     ", caption)

# %% [markdown]
# ## Modality specialisation per layer
#
# Over a few dozen images with their captions: for each MoE layer, the share of image and
# of text tokens each expert takes, the Jensen-Shannon divergence between those two
# distributions against a **shuffle baseline** (the same tokens with the image/text labels
# permuted: what the divergence looks like when routing ignores modality), and the
# normalised mutual information between top-1 expert and modality.

# %%
from workbench.analysis import modality_specialisation

rng = np.random.default_rng(0)
traces = []
for _ in range(24):
    img, cap = sample(rng)
    i, pv = processor("<|image|> " + cap, [img])
    traces.append(model.run(i, pixel_values=pv,
                            capture=["*.moe.topk_indices", "token_modality"]).trace)
result = modality_specialisation(traces)
for r in result:
    print(f"layer {r.layer}: JS {r.js:.3f} bits (shuffled {r.js_shuffled:.3f}, p95 "
          f"{r.js_shuffled_p95:.3f}), NMI {r.nmi:.3f}, image share per expert "
          f"{np.round(r.image_share, 2)}")
plots.modality_specialisation_plot(result)

# %% [markdown]
# The model card measured the same on 64 held-out images, for the trained model and for the
# same weights before training (the bundled text model with a random tower):

# %%
card = json.loads((MODEL / "training_results.json").read_text())["routing_by_modality"]
for layer in card["trained"]:
    print(f"layer {layer}: NMI(expert, modality) untrained {card['untrained'][layer]['nmi']:.3f}"
          f" -> trained {card['trained'][layer]['nmi']:.3f}")

# %% [markdown]
# ## Patches coloured by their top-1 expert
#
# Each `<|patch|>` token stands for a 2×2 block of ViT patches (pixel shuffle); here each is
# drawn over its part of the image in its expert's colour, per layer.

# %%
plots.patch_expert_overlay(out.trace, image, model.config.moe_layers)

# %% [markdown]
# ## The explorer with an image
#
# `RoutingExplorer(..., image=...)` shows the patch grid above the tokens, both coloured by
# expert at the selected layer; the layer slider recolours both, and clicking a token (an image
# placeholder too) follows it through the layers.

# %%
from workbench.widgets import RoutingExplorer

explorer = RoutingExplorer(model, tok, image=image, text="<|image|> " + caption)
explorer
