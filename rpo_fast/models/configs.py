"""The parts that the families' declared random-model configs share (``ModelFamily.tiny`` and ``.full``, declared in
each family's file): the tiny ones of the CPU tests and the full-size text encoders and VAEs, with their values from
the public model configs. ``rpo_fast.testing`` builds models from the families' declarations; the meta-device plans
count them. Nothing here loads anything.
"""

CLIP_TOKENS = 77  # the CLIP tokenizers' padded length (model_max_length)

# ------------------------------------------------------------------------------------------------ tiny (CPU tests)
TINY_HIDDEN = 32  # the tiny text encoders' width; the SDXL-style UNet cross-attends to 2 * TINY_HIDDEN
TINY_BOS, TINY_EOS = 512, 513  # the specials of rpo_fast.testing's byte-level CLIP tokenizer (514 tokens)
T5_TINY = 64  # the tiny T5's width: the transformers' joint_attention_dim (>= SD3's two CLIP widths side by side)

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)  # downsamples by 2: 32px images -> 16x16 latents
TINY_FLOW_VAE = dict(TINY_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
TINY_CLIP_TEXT = dict(
    vocab_size=514,
    hidden_size=TINY_HIDDEN,
    intermediate_size=37,
    num_hidden_layers=2,  # SDXL reads the penultimate hidden state: at least 2 layers
    num_attention_heads=4,
    max_position_embeddings=CLIP_TOKENS,
    projection_dim=TINY_HIDDEN,
    hidden_act="gelu",
    bos_token_id=TINY_BOS,
    eos_token_id=TINY_EOS,
    pad_token_id=TINY_EOS,
)
TINY_T5 = dict(
    vocab_size=3 + 1 + 2 * 94,  # rpo_fast.testing's t5_tokenizer(): specials, the word marker, 94 characters x 2
    d_model=T5_TINY,
    d_kv=8,
    d_ff=37,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    feed_forward_proj="gated-gelu",  # T5 v1.1, as T5-XXL
    is_encoder_decoder=False,
    pad_token_id=0,
    eos_token_id=1,
)

# ------------------------------------------------------------------------------------------------ full size
FULL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
)
FLOW_VAE = dict(FULL_VAE, latent_channels=16, sample_size=1024, use_quant_conv=False, use_post_quant_conv=False)
CLIP_L_TEXT = dict(  # openai/clip-vit-large-patch14 text tower (SD1.5, SDXL's first encoder)
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    projection_dim=768,
    hidden_act="quick_gelu",
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=1,
)
CLIP_BIGG_TEXT = dict(  # laion CLIP ViT-bigG/14 text tower (SDXL's second encoder, with projection)
    CLIP_L_TEXT,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    projection_dim=1280,
    hidden_act="gelu",
)
T5_XXL = dict(  # google/t5-v1_1-xxl's encoder (SD3's text_encoder_3, FLUX's text_encoder_2)
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
    pad_token_id=0, eos_token_id=1,
)  # fmt: skip
