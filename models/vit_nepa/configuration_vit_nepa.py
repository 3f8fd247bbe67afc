"""Configuration of ViT-NEPA: a causal ViT with 2-D RoPE, QK-norm and LayerScale."""

from transformers import PretrainedConfig
from transformers.backbone_utils import BackboneConfigMixin


def default_out_indices(num_hidden_layers: int) -> list[int]:
    """The blocks a segmentation backbone reads, 1-based: about a third, half, two thirds and all of the
    depth (4/6/8/12 for ViT-B, 8/12/16/24 for ViT-L, as MAE and BEiT did); the last block alone when there
    are fewer than four."""
    if num_hidden_layers < 4:
        return [num_hidden_layers]
    blocks = [num_hidden_layers]
    for fraction in (2 / 3, 1 / 2, 1 / 3):
        blocks.insert(0, min(blocks[0] - 1, max(round(num_hidden_layers * fraction), 4 - len(blocks))))
    return blocks


class ViTNepaConfig(BackboneConfigMixin, PretrainedConfig):
    r"""
    Configuration of a [`ViTNepaModel`]. The defaults are a plain ViT-B/16 (no QK-norm, classifier on the
    last token), the model card's table; the released architectures are the named constructors
    [`ViTNepaConfig.nepa_base`] and [`ViTNepaConfig.nepa_large`] (patch 14, QK-norm, mean pooling).

    Args:
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size:
            Transformer width, depth, heads and MLP width.
        use_gated_mlp (`bool`): `act(gate_proj(x)) * up_proj(x)` (SwiGLU with `hidden_act="silu"`)
            instead of `act(up_proj(x))`.
        hidden_act (`str`): MLP activation.
        hidden_dropout_prob, attention_probs_dropout_prob (`float`): dropout on the embeddings and
            after each dense output, and on the attention probabilities.
        initializer_range (`float`): std of the truncated normal used for weights.
        layer_norm_eps (`float`): epsilon of every LayerNorm, QK-norm included.
        rope_theta (`float`): RoPE base; frequencies are `rope_theta ** (-4 j / head_dim)`.
        image_size (`int`), patch_size (`int`), num_channels: the native (square) input geometry. Any
            image whose sides are multiples of `patch_size` runs.
        qkv_bias (`bool`): biases on the query, key and value projections.
        qk_norm, qk_norm_affine, qk_norm_bias (`bool`): LayerNorm over head_dim on queries and keys,
            with a learned weight and, further, a learned bias.
        layerscale_value (`float` or `None`): initial LayerScale; `None` removes LayerScale.
        drop_path_prob (`float`): stochastic depth of the last layer; rates rise linearly from 0.
        add_pooling_layer (`bool`): classifier on the mean of the patch tokens after `fc_norm`;
            otherwise on the last token.
        is_causal (`bool`): token t attends to tokens <= t only.
        pos_embed_shift, pos_embed_jitter, pos_embed_rescale (`float` or `None`): training-time
            augmentation of the RoPE coordinates (uniform shift, per-axis and global log-uniform scale).
        use_rope (`bool`): `False` replaces RoPE by a learned absolute position embedding (ablation).
        nepa_shift (`bool`): predict the next embedding (`True`) or the current one (ablation).
        nepa_stop_grad (`bool`): detach the targets of the NEPA loss.
        nepa_mask_ratio (`float`): fraction of patch inputs replaced by a learned mask token during
            pretraining; targets stay clean.
        out_features, out_indices (`list`): what [`ViTNepaBackbone`] returns. Stage `stem` (index 0) is
            the embeddings and `stageN` (index N) the output of block N, counted from 1. Default:
            `default_out_indices(num_hidden_layers)`.
    """

    model_type = "vit_nepa"

    def __init__(
        self,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        use_gated_mlp=False,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.02,
        layer_norm_eps=1e-12,
        rope_theta=100.0,
        image_size=224,
        patch_size=16,
        num_channels=3,
        qkv_bias=True,
        qk_norm=False,
        qk_norm_bias=False,
        qk_norm_affine=False,
        layerscale_value=1e-5,
        drop_path_prob=0.0,
        add_pooling_layer=False,
        is_causal=True,
        pos_embed_shift=None,
        pos_embed_jitter=None,
        pos_embed_rescale=2.0,
        use_rope=True,
        nepa_shift=True,
        nepa_stop_grad=True,
        nepa_mask_ratio=0.0,
        out_features=None,
        out_indices=None,
        **kwargs,
    ):
        kwargs.pop("num_prompt_token", None)  # carried by released files, always 0
        kwargs.pop("stage_names", None)  # derived from the depth below
        kwargs.pop("auto_map", None)  # always the one below
        super().__init__(**kwargs)
        # Where plain `transformers` (`trust_remote_code=True`) finds each class: in the two files that
        # `save_pretrained` copies beside config.json.
        self.auto_map = dict(AUTO_MAP)
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.use_gated_mlp = use_gated_mlp
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.rope_theta = rope_theta
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.qkv_bias = qkv_bias
        self.qk_norm = qk_norm
        self.qk_norm_bias = qk_norm_bias
        self.qk_norm_affine = qk_norm_affine
        self.layerscale_value = layerscale_value
        self.drop_path_prob = drop_path_prob
        self.add_pooling_layer = add_pooling_layer
        self.is_causal = is_causal
        self.pos_embed_shift = pos_embed_shift
        self.pos_embed_jitter = pos_embed_jitter
        self.pos_embed_rescale = pos_embed_rescale
        self.use_rope = use_rope
        self.nepa_shift = nepa_shift
        self.nepa_stop_grad = nepa_stop_grad
        self.nepa_mask_ratio = nepa_mask_ratio
        self.stage_names = ["stem"] + [f"stage{block}" for block in range(1, num_hidden_layers + 1)]
        if out_features is None and out_indices is None:
            out_indices = default_out_indices(num_hidden_layers)
        self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)
        self.check_geometry()

    def check_geometry(self):
        """Raise `ValueError` naming the numbers when the architecture cannot be built."""
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}: choose a head count that divides the hidden size."
            )
        head_dim = self.hidden_size // self.num_attention_heads
        if self.use_rope and head_dim % 4:
            raise ValueError(
                f"2-D RoPE needs a head_dim divisible by 4, got {head_dim} "
                f"(hidden_size {self.hidden_size} / num_attention_heads {self.num_attention_heads})."
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"patch_size {self.patch_size} does not divide image_size {self.image_size}: "
                f"choose an image size that is a multiple of the patch size."
            )
        if not 0.0 <= self.drop_path_prob < 1.0:
            raise ValueError(f"drop_path_prob must lie in [0, 1), got {self.drop_path_prob}.")
        if not 0.0 <= self.nepa_mask_ratio < 1.0:
            raise ValueError(f"nepa_mask_ratio must lie in [0, 1), got {self.nepa_mask_ratio}.")

    @classmethod
    def nepa_base(cls, **kwargs) -> "ViTNepaConfig":
        """The released NEPA-B/14 pretraining architecture (`configs/pretrain/nepa-base-patch14-224`); `kwargs` change it."""
        return cls(**{**NEPA_BASE, **kwargs})

    @classmethod
    def nepa_large(cls, **kwargs) -> "ViTNepaConfig":
        """The released NEPA-L/14 pretraining architecture (`configs/pretrain/nepa-large-patch14-224`); `kwargs` change it."""
        return cls(**{**NEPA_LARGE, **kwargs})


AUTO_MAP = {
    "AutoConfig": "configuration_vit_nepa.ViTNepaConfig",
    "AutoModel": "modeling_vit_nepa.ViTNepaModel",
    "AutoModelForPreTraining": "modeling_vit_nepa.ViTNepaForPreTraining",
    "AutoModelForImageClassification": "modeling_vit_nepa.ViTNepaForImageClassification",
    "AutoBackbone": "modeling_vit_nepa.ViTNepaBackbone",
}

# What the released configs change from the defaults.
NEPA_BASE = dict(patch_size=14, qk_norm=True, add_pooling_layer=True)
NEPA_LARGE = dict(
    NEPA_BASE, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, qk_norm_affine=True
)
