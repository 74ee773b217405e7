"""Tiny models of real architectures, built from config with a tokenizer trained here, saved to a folder
and loaded back through the same code users run (no hub access)."""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
CORPUS = [
    "User: Describe this image in one or two sentences. Mention what the image depicts and quote any text shown.",
    "Assistant: A single red circle drawn on a plain light background.",
    "Proposed answer: blue Is the proposed answer wrong? Answer Yes or No. No Yes No",
    "what color is the shape? what shape is in the image? circle rectangle triangle red blue green yellow gray teal",
    "Write a plausible but incorrect answer to this question, in the same style and length as the correct one.",
]


def build_tiny_smolvlm(folder: Path, context: int = 256) -> Path:
    """An Idefics3 (SmolVLM) model: 2-layer Llama text model, 1-layer vision tower, 32 px images, 4 image tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor,
                              Idefics3Processor, LlamaConfig, PreTrainedTokenizerFast)

    special = ["<pad>", "<unk>", "<|im_start|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>", "<global-img>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                                                   initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<|im_start|>", eos_token="<end_of_utterance>", model_max_length=context)
    fast.add_special_tokens({"additional_special_tokens": ["<image>", "<fake_token_around_image>", "<global-img>"]})
    text = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=context, pad_token_id=fast.pad_token_id,
                       bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    config = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
        text_config=text.to_dict(), scale_factor=2, image_token_id=fast.convert_tokens_to_ids("<image>"), pad_token_id=fast.pad_token_id,
    )
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    Idefics3ForConditionalGeneration(config).save_pretrained(folder)
    image_processor = Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": 32}, max_image_size={"longest_edge": 32})
    Idefics3Processor(image_processor=image_processor, tokenizer=fast, image_seq_len=4, chat_template=CHAT_TEMPLATE).save_pretrained(folder)
    return folder
