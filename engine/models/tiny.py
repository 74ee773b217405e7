"""Models of real architectures built from config, with random weights and a tokenizer trained on the spot,
saved to a folder: tests and benchmarks load them through the same code users run, with no hub access.

- ``tiny``: an Idefics3 (SmolVLM) model of a few hundred thousand parameters, well under a second per call.
- ``tiny-h64``: the same with 64-wide attention heads, as vLLM's attention kernels need.
- ``smolvlm-256m``: the layer sizes of SmolVLM-256M (SigLIP-B/16 vision tower at 512 px, 30-layer 576-wide
  SmolLM2 text model, 64 image tokens): random weights, but honest compute for throughput figures.

``build_tiny_qwen2_5_vl`` and ``build_tiny_llava_onevision`` build tiny Qwen2.5-VL (the default captioner's
architecture) and LLaVA-OneVision models the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_CHAT_TEMPLATE = QWEN_CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>")
CORPUS = [
    "User: Describe this image in one or two sentences. Mention what the image depicts and quote any text shown.",
    "Assistant: A single red circle drawn on a plain light background.",
    "Proposed answer: blue Is the proposed answer wrong? Answer Yes or No. No Yes No",
    "what color is the shape? what shape is in the image? circle rectangle triangle red blue green yellow gray teal",
    "Write a plausible but incorrect answer to this question, in the same style and length as the correct one.",
]


SIZES = {
    "tiny": dict(text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
                 vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
                 scale_factor=2, vocab_size=None),
    # the tiny model with 64-wide attention heads, the smallest size vLLM's attention kernels take
    "tiny-h64": dict(text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1),
                     vision=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
                     scale_factor=2, vocab_size=None),
    "smolvlm-256m": dict(text=dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3),
                         vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=512, patch_size=16),
                         scale_factor=4, vocab_size=49280),
}


def _tokenizer(special: list[str], pad: str, eos: str, context: int, unk: str | None = None, bos: str | None = None,
               extra: list[str] = ()):
    """A byte-level BPE tokenizer of 400 tokens trained on ``CORPUS``, with the architecture's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=unk))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                                                   initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=pad, unk_token=unk, bos_token=bos, eos_token=eos,
                                   model_max_length=context)
    if extra:
        fast.add_special_tokens({"additional_special_tokens": list(extra)})
    return fast


def build_tiny_smolvlm(folder: Path, context: int = 256, size: str = "tiny") -> Path:
    """An Idefics3 (SmolVLM) model of the given ``size`` (see ``SIZES``), saved with its processor."""
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor,
                              Idefics3Processor, LlamaConfig)

    fast = _tokenizer(["<pad>", "<unk>", "<|im_start|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>", "<global-img>"],
                      pad="<pad>", unk="<unk>", bos="<|im_start|>", eos="<end_of_utterance>", context=context,
                      extra=["<image>", "<fake_token_around_image>", "<global-img>"])
    shape = SIZES[size]
    text = LlamaConfig(vocab_size=shape["vocab_size"] or len(fast), max_position_embeddings=context, pad_token_id=fast.pad_token_id,
                       bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, **shape["text"])
    config = Idefics3Config(vision_config=shape["vision"], text_config=text.to_dict(), scale_factor=shape["scale_factor"],
                            image_token_id=fast.convert_tokens_to_ids("<image>"), pad_token_id=fast.pad_token_id)
    image_size = shape["vision"]["image_size"]
    image_tokens = (image_size // shape["vision"]["patch_size"]) ** 2 // shape["scale_factor"] ** 2
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    Idefics3ForConditionalGeneration(config).save_pretrained(folder)
    image_processor = Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": image_size},
                                             max_image_size={"longest_edge": image_size})
    Idefics3Processor(image_processor=image_processor, tokenizer=fast, image_seq_len=image_tokens,
                      chat_template=CHAT_TEMPLATE).save_pretrained(folder)
    return folder


def build_tiny_qwen2_5_vl(folder: Path, context: int = 512) -> Path:
    """A Qwen2.5-VL model of a few hundred thousand parameters (one-block window-attention vision tower,
    M-RoPE text model), saved as the hub's Qwen2.5-VL folders are: weights, tokenizer with chat template and
    image processor. In transformers 5 its processor also needs a video processor, which needs torchvision;
    that part is saved only where torchvision is installed."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    fast = _tokenizer(special, pad="<|endoftext|>", eos="<|im_end|>", context=context)
    ids = {token: fast.convert_tokens_to_ids(token) for token in special}
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=context, bos_token_id=None,
                         pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=56, out_hidden_size=32, fullatt_block_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder)
    images = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56)  # 1 to 4 image tokens
    _save_processor(folder, "Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor", images, fast, QWEN_CHAT_TEMPLATE)
    return folder


def build_tiny_llava_onevision(folder: Path, context: int = 512) -> Path:
    """A LLaVA-OneVision model of a few hundred thousand parameters (SigLIP tower at 32 px, anyres tiling up
    to 2x2 tiles, Qwen2 text model), saved like ``build_tiny_qwen2_5_vl``."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision import LlavaOnevisionImageProcessorPil

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    fast = _tokenizer(special, pad="<|endoftext|>", eos="<|im_end|>", context=context)
    ids = {token: fast.convert_tokens_to_ids(token) for token in special}
    tiles = [[32, 32], [32, 64], [64, 32], [64, 64]]
    config = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        text_config=dict(model_type="qwen2", vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context, bos_token_id=None,
                         pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"]),
        image_token_index=ids["<image>"], video_token_index=ids["<video>"], image_grid_pinpoints=tiles,
        vision_feature_layer=-1, vision_feature_select_strategy="full")
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    LlavaOnevisionForConditionalGeneration(config).save_pretrained(folder)
    images = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32},
                                             image_grid_pinpoints=tiles)
    _save_processor(folder, "LlavaOnevisionProcessor", "LlavaOnevisionVideoProcessor", images, fast, LLAVA_CHAT_TEMPLATE,
                    num_image_tokens=16, vision_feature_select_strategy="full")
    return folder


def _save_processor(folder: Path, processor: str, video_processor: str, images, tokenizer, chat_template: str, **kwargs) -> None:
    """Save the whole processor where torchvision is installed (transformers 5 needs it for the video part);
    otherwise the parts that do not need it, as a hub folder has them."""
    import transformers

    try:
        video = getattr(transformers, video_processor)()
    except ImportError:
        tokenizer.chat_template = chat_template
        tokenizer.save_pretrained(folder)
        images.save_pretrained(folder)
    else:
        getattr(transformers, processor)(image_processor=images, tokenizer=tokenizer, video_processor=video,
                                         chat_template=chat_template, **kwargs).save_pretrained(folder)
