"""The default text encoder (open_clip ViT-L-14-quickgelu, pipeline/encoders.py) gives U-ViT's text states.

U-ViT (libs/clip.py FrozenCLIPEmbedder) runs transformers' CLIPTokenizer + CLIPTextModel
(openai/clip-vit-large-patch14) with truncation to 77, padding="max_length" (the pad token is the end token
49407), no attention mask, and keeps `last_hidden_state`. Here a small random CLIPTextModel with the real
vocabulary is mapped into an open_clip text tower, the transformers tokenizer is built from open_clip's own
BPE file (no hub), and both paths must give the same tokens and the same states on ~100 captions.

U-ViT pinned transformers 4.23.1, whose CLIPTokenizer ran ftfy.fix_text, whitespace cleaning and lower-casing
in Python before the BPE; transformers 5's CLIPTokenizer is tokenizers-backed and normalises only NFC,
whitespace and case. `uvit_tokenize` therefore applies ftfy.fix_text first, as 4.23 did.
"""
import gzip
import json
from importlib import resources

import ftfy
import pytest
import torch

from pipeline.encoders import END_TOKEN, TEXT_LEN, TextEncoder

WIDTH, HEADS, LAYERS = 64, 4, 2

WORDS = ("a man riding a bike down a street next to tall buildings while a dog runs behind him in the rain "
         "two cats sleep on a red couch near the window with plants and books").split()
CAPTIONS = (
    ["", "   ", "A", "a photo of a cat", "A photo of a CAT.", "Two  dogs\tplaying\nin the snow ",
     "Café crème on a naïve façade", "Ein Hund läuft über die Straße", "一只猫坐在桌子上",
     "кошка на диване",
     "a bike 🚲 and a cat 🐱", "ＦＵＬＬ-width letters", "the ﬁsh market", "A man’s “red” bike",
     "numbers 1234567 and 3.14", "it's, they're, we'll, I'd", "a" * 300, "html &amp; entities",
     " ".join(WORDS * 3),  # ~130 tokens: truncated
     " ".join(["word"] * 75), " ".join(["word"] * 76),  # exactly fits / one too many (75 tokens + start + end)
     ]
    + [" ".join(WORDS[i:i + 3 + i % 17]) for i in range(0, 80)]
)


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """transformers' CLIPTokenizer from vocab.json / merges.txt derived from open_clip's shipped BPE file,
    the same construction as OpenAI's vocabulary (bytes, bytes + </w>, merges, the two specials)."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    folder = tmp_path_factory.mktemp("hf_tokenizer")
    bpe = resources.files("open_clip") / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(bpe.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408
    (folder / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(folder))


def uvit_tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """U-ViT's FrozenCLIPEmbedder.forward tokenisation (with transformers 4.23's ftfy step)."""
    fixed = [ftfy.fix_text(c) for c in captions]
    return tokenizer(fixed, truncation=True, max_length=TEXT_LEN, return_length=True,
                     return_overflowing_tokens=False, padding="max_length", return_tensors="pt")["input_ids"]


@pytest.fixture(scope="module")
def models():
    """A random transformers CLIPTextModel (OpenAI's layout: QuickGELU, eps 1e-5) and the open_clip tower
    holding the same weights, wrapped as this project's TextEncoder."""
    import open_clip
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=WIDTH, intermediate_size=4 * WIDTH,
                            num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=TEXT_LEN,
                            hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407,
                            pad_token_id=49407)
    hf = CLIPTextModel(config).eval()
    for p in hf.parameters():  # non-trivial biases and norms, so a missed tensor shows
        torch.nn.init.normal_(p, std=0.05)
    ours = open_clip.CLIP(embed_dim=WIDTH, quick_gelu=True,
                          vision_cfg={"image_size": 8, "layers": 1, "width": 64, "patch_size": 8},
                          text_cfg={"context_length": TEXT_LEN, "vocab_size": 49408, "width": WIDTH,
                                    "heads": HEADS, "layers": LAYERS})
    missing, unexpected = ours.load_state_dict(hf_to_open_clip(hf.state_dict()), strict=False)
    assert not unexpected and all(k.startswith("visual.") or k in ("text_projection", "logit_scale")
                                  for k in missing)
    encoder = TextEncoder(ours, open_clip.get_tokenizer("ViT-L-14-quickgelu"), "test")
    return hf, encoder


def hf_to_open_clip(state: dict) -> dict:
    """transformers CLIPTextModel keys -> open_clip CLIP text tower keys (q, k, v packed into in_proj)."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}  # transformers 4 nests text_model.
    t = ""
    out = {"token_embedding.weight": state[f"{t}embeddings.token_embedding.weight"],
           "positional_embedding": state[f"{t}embeddings.position_embedding.weight"],
           "ln_final.weight": state[f"{t}final_layer_norm.weight"], "ln_final.bias": state[f"{t}final_layer_norm.bias"]}
    for i in range(LAYERS):
        hf, oc = f"{t}encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{oc}attn.in_proj_{kind}"] = torch.cat([state[f"{hf}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{oc}{a}.{kind}"] = state[f"{hf}{b}.{kind}"]
    return out


def test_tokens_equal_uvit_tokenizer(hf_tokenizer, models):
    _, encoder = models
    ours, truncated = encoder.tokenize(CAPTIONS)
    theirs = uvit_tokenize(hf_tokenizer, CAPTIONS)
    assert len(CAPTIONS) >= 100
    assert torch.equal(ours, theirs), [c for c, a, b in zip(CAPTIONS, ours, theirs) if not torch.equal(a, b)]
    assert (ours[0, 2:] == END_TOKEN).all()  # "" is [start, end] then end-token padding, as U-ViT pads
    assert truncated.sum() >= 2 and not truncated[CAPTIONS.index(" ".join(["word"] * 75))]


def test_the_one_known_token_difference_is_a_literal_special_token(hf_tokenizer, models):
    """transformers reads "<|endoftext|>" typed inside a caption as the end token; open_clip spells it out
    as text. No COCO caption contains it; the states differ only for such a caption."""
    _, encoder = models
    caption = ["a caption with <|endoftext|> inside"]
    ours, theirs = encoder.tokenize(caption)[0][0], uvit_tokenize(hf_tokenizer, caption)[0]
    assert (theirs[:6] == END_TOKEN).sum() == 1 and END_TOKEN not in ours[:6].tolist()


def test_states_equal_uvit_last_hidden_state(hf_tokenizer, models):
    hf, encoder = models
    tokens = uvit_tokenize(hf_tokenizer, CAPTIONS)
    with torch.no_grad():
        theirs = hf(input_ids=tokens).last_hidden_state  # no attention mask, as U-ViT calls it
    ours = encoder(CAPTIONS)
    diff = (ours - theirs).abs().max().item()
    print(f"max |open_clip - transformers| over {len(CAPTIONS)} captions x {TEXT_LEN} positions: {diff:.3g}")
    assert ours.shape == theirs.shape == (len(CAPTIONS), TEXT_LEN, WIDTH)
    assert diff <= 1e-5
    # The null context U-ViT saves (extract_empty_feature.py) is the "" encoding: the same here.
    assert (encoder([""])[0] - theirs[0]).abs().max() <= 1e-5
