"""ViT-NEPA: a causal Vision Transformer trained by next-embedding prediction.

Parameter names and the forward pass follow the released `SixAILab/nepa-*` checkpoints: a pre-norm
ViT over CLS + patch tokens with 2-D RoPE on the patch tokens, QK-norm and LayerScale, and no
absolute position embedding (unless `use_rope=False`, an ablation).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_outputs import BackboneOutput
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple

from .configuration_vit_nepa import ViTNepaConfig


@dataclass
class ViTNepaModelOutput(ModelOutput):
    """
    last_hidden_state: tokens after the final LayerNorm, (batch, 1 + patches, hidden).
    input_embeddings: CLS + patch embeddings before masking, position embedding and dropout; the
        NEPA targets. (batch, 1 + patches, hidden).
    hidden_states: the embeddings fed to the first layer, then each layer's output.
    attentions: each layer's attention probabilities, (batch, heads, tokens, tokens).
    """

    last_hidden_state: torch.FloatTensor | None = None
    input_embeddings: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class ViTNepaForPreTrainingOutput(ModelOutput):
    """
    loss: the NEPA loss, negative cosine between predictions and (shifted) targets.
    last_hidden_state: the predictions, (batch, 1 + patches, hidden).
    input_embeddings: the targets before shifting, (batch, 1 + patches, hidden).
    """

    loss: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    input_embeddings: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class ViTNepaImageClassifierOutput(ModelOutput):
    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole residual branches per sample, rescale the survivors."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
    return x * mask / keep_prob


class ViTNepaDropPath(nn.Module):
    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class ViTNepaPatchEmbeddings(nn.Module):
    """Conv2d patchify; tokens come out in raster order (row by row)."""

    def __init__(self, config: ViTNepaConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.num_channels = config.num_channels
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be (batch, channels, height, width), got shape {tuple(pixel_values.shape)}.")
        _, channels, height, width = pixel_values.shape
        if channels != self.num_channels:
            raise ValueError(
                f"pixel_values have {channels} channels but the config expects num_channels={self.num_channels}: "
                f"convert the images (e.g. to RGB) or build the model with num_channels={channels}."
            )
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of patch_size {self.patch_size}: "
                f"resize or crop the images to multiples of {self.patch_size}."
            )
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class ViTNepaEmbeddings(nn.Module):
    """CLS + patch tokens. Returns the encoder input and the clean embeddings used as NEPA targets."""

    def __init__(self, config: ViTNepaConfig):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size)) if config.nepa_mask_ratio > 0 else None
        self.patch_embeddings = ViTNepaPatchEmbeddings(config)
        if config.use_rope:
            self.position_embeddings = None
        else:
            grid = config.image_size // config.patch_size
            self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + grid * grid, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def absolute_position_embeddings(self, rows: int, cols: int) -> torch.Tensor:
        """The learned table, bicubically resized when the patch grid differs from the native one."""
        table = self.position_embeddings
        native = math.isqrt(table.shape[1] - 1)
        if (rows, cols) == (native, native):
            return table
        patch_table = table[:, 1:].reshape(1, native, native, -1).permute(0, 3, 1, 2)
        patch_table = F.interpolate(patch_table.float(), size=(rows, cols), mode="bicubic", align_corners=False)
        patch_table = patch_table.to(table.dtype).flatten(2).transpose(1, 2)
        return torch.cat([table[:, :1], patch_table], dim=1)

    def forward(
        self, pixel_values: torch.Tensor, bool_masked_pos: torch.BoolTensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        patches = self.patch_embeddings(pixel_values)
        cls = self.cls_token.expand(patches.shape[0], -1, -1).to(patches.dtype)
        targets = torch.cat([cls, patches], dim=1)

        if bool_masked_pos is not None:
            if self.mask_token is None:
                raise ValueError("bool_masked_pos was given but the model has no mask token: set nepa_mask_ratio > 0.")
            keep = (~bool_masked_pos).unsqueeze(-1).to(patches.dtype)
            patches = patches * keep + self.mask_token.to(patches.dtype) * (1.0 - keep)
        embeddings = torch.cat([cls, patches], dim=1)

        if self.position_embeddings is not None:
            rows = pixel_values.shape[-2] // self.patch_embeddings.patch_size
            cols = pixel_values.shape[-1] // self.patch_embeddings.patch_size
            embeddings = embeddings + self.absolute_position_embeddings(rows, cols)
        return self.dropout(embeddings), targets


class ViTNepaRopePositionEmbedding(nn.Module):
    """Axial 2-D RoPE over patch centres in [-1, 1], with training-time coordinate augmentation.

    Holds no buffers: the tables are tiny and computed per forward from the actual patch grid, which
    also keeps `from_pretrained` (which skips `__init__`-time tensor creation) from seeing garbage.
    """

    def __init__(self, config: ViTNepaConfig):
        super().__init__()
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.theta = config.rope_theta
        self.shift = config.pos_embed_shift
        self.jitter = config.pos_embed_jitter
        self.rescale = config.pos_embed_rescale

    def forward(self, rows: int, cols: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        ys = (torch.arange(rows, device=device, dtype=torch.float32) + 0.5) / rows * 2 - 1
        xs = (torch.arange(cols, device=device, dtype=torch.float32) + 0.5) / cols * 2 - 1
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)  # (rows*cols, 2) as (y, x)

        if self.training:
            if self.shift is not None:
                coords = coords + torch.empty(2, device=device).uniform_(-self.shift, self.shift)
            if self.jitter is not None:
                log_j = math.log(self.jitter)
                coords = coords * torch.empty(2, device=device).uniform_(-log_j, log_j).exp()
            if self.rescale is not None:
                log_r = math.log(self.rescale)
                coords = coords * torch.empty(1, device=device).uniform_(-log_r, log_r).exp()

        inv_freq = self.theta ** (-torch.arange(self.head_dim // 4, device=device, dtype=torch.float32) * 4 / self.head_dim)
        angles = 2 * math.pi * coords[:, :, None] * inv_freq  # (patches, 2, head_dim/4)
        angles = angles.flatten(1).tile(2)  # (patches, head_dim): y-freqs, x-freqs, repeated
        return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope_to_patches(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the patch tokens of (batch, heads, tokens, head_dim) in float32; CLS (position 0) is left as is."""
    cls, patches = x[:, :, :1], x[:, :, 1:]
    patches_fp32 = patches.float()
    rotated = patches_fp32 * cos + rotate_half(patches_fp32) * sin
    return torch.cat([cls, rotated.to(x.dtype)], dim=2)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    is_causal: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with materialised probabilities, for `output_attentions` and `attn_implementation="eager"`."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if is_causal:
        tokens = query.shape[-2]
        future = torch.ones(tokens, tokens, dtype=torch.bool, device=query.device).triu(1)
        scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return output, probs


class ViTNepaSelfAttention(nn.Module):
    def __init__(self, config: ViTNepaConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = config.is_causal
        self.dropout_prob = config.attention_probs_dropout_prob
        self.query = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.key = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.value = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        if config.qk_norm:
            norm = dict(eps=config.layer_norm_eps, elementwise_affine=config.qk_norm_affine, bias=config.qk_norm_bias)
            self.q_norm = nn.LayerNorm(self.head_dim, **norm)
            self.k_norm = nn.LayerNorm(self.head_dim, **norm)
        else:
            self.q_norm = nn.Identity()
            self.k_norm = nn.Identity()

    def forward(
        self,
        hidden_states: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, tokens, _ = hidden_states.shape
        heads_shape = (batch, tokens, self.num_heads, self.head_dim)
        query = self.q_norm(self.query(hidden_states).view(heads_shape)).transpose(1, 2)
        key = self.k_norm(self.key(hidden_states).view(heads_shape)).transpose(1, 2)
        value = self.value(hidden_states).view(heads_shape).transpose(1, 2)
        if rope is not None:
            query = apply_rope_to_patches(query, *rope)
            key = apply_rope_to_patches(key, *rope)

        implementation = "eager" if output_attentions else self.config._attn_implementation
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        # Under autocast the QK-norm and RoPE run in float32; the kernels want one dtype.
        output, probs = attention(
            self,
            query,
            key.to(query.dtype),
            value.to(query.dtype),
            None,
            scaling=self.scaling,
            dropout=self.dropout_prob if self.training else 0.0,
            is_causal=self.is_causal,
        )
        return output.reshape(batch, tokens, -1), probs


class ViTNepaSelfOutput(nn.Module):
    def __init__(self, config: ViTNepaConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense(hidden_states))


class ViTNepaAttention(nn.Module):
    def __init__(self, config: ViTNepaConfig):
        super().__init__()
        self.attention = ViTNepaSelfAttention(config)
        self.output = ViTNepaSelfOutput(config)

    def forward(self, hidden_states, rope, output_attentions=False):
        context, probs = self.attention(hidden_states, rope, output_attentions)
        return self.output(context), probs


class ViTNepaLayerScale(nn.Module):
    def __init__(self, config: ViTNepaConfig):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((config.hidden_size,), float(config.layerscale_value)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states * self.lambda1


def layer_scale_or_identity(config: ViTNepaConfig) -> nn.Module:
    return ViTNepaLayerScale(config) if config.layerscale_value is not None else nn.Identity()


class ViTNepaIntermediate(nn.Module):
    """`act(up_proj(x))`, or the gated `act(gate_proj(x)) * up_proj(x)`."""

    def __init__(self, config: ViTNepaConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size) if config.use_gated_mlp else None
        self.act = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is None:
            return self.act(self.up_proj(hidden_states))
        return self.act(self.gate_proj(hidden_states)) * self.up_proj(hidden_states)


class ViTNepaOutput(nn.Module):
    def __init__(self, config: ViTNepaConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layer_scale = layer_scale_or_identity(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.layer_scale(self.dropout(self.dense(hidden_states)))


class ViTNepaLayer(GradientCheckpointingLayer):
    """Pre-norm block: x + drop_path(ls1 * attn(LN(x))), then x + drop_path(ls2 * mlp(LN(x)))."""

    def __init__(self, config: ViTNepaConfig, drop_path_prob: float = 0.0):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = ViTNepaAttention(config)
        self.layer_scale = layer_scale_or_identity(config)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.intermediate = ViTNepaIntermediate(config)
        self.output = ViTNepaOutput(config)
        self.drop_path = ViTNepaDropPath(drop_path_prob)

    def forward(self, hidden_states, rope=None, output_attentions=False):
        attended, probs = self.attention(self.layernorm_before(hidden_states), rope, output_attentions)
        hidden_states = hidden_states + self.drop_path(self.layer_scale(attended))
        mlp = self.output(self.intermediate(self.layernorm_after(hidden_states)))
        hidden_states = hidden_states + self.drop_path(mlp)
        return hidden_states, probs


class ViTNepaEncoder(nn.Module):
    def __init__(self, config: ViTNepaConfig):
        super().__init__()
        rates = torch.linspace(0, config.drop_path_prob, config.num_hidden_layers).tolist()
        self.layer = nn.ModuleList([ViTNepaLayer(config, rate) for rate in rates])
        self.rope = ViTNepaRopePositionEmbedding(config) if config.use_rope else None

    def forward(self, hidden_states, grid: tuple[int, int], output_attentions=False, output_hidden_states=False):
        # One RoPE table (and one draw of its augmentation) per forward, shared by all layers.
        rope = self.rope(*grid, device=hidden_states.device) if self.rope is not None else None
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layer:
            hidden_states, probs = layer(hidden_states, rope, output_attentions)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (probs,)
        return hidden_states, all_hidden_states, all_attentions


class ViTNepaPreTrainedModel(PreTrainedModel):
    config: ViTNepaConfig
    config_class = ViTNepaConfig
    base_model_prefix = "vit_nepa"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["ViTNepaEmbeddings", "ViTNepaLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    accepts_loss_kwargs = False  # the losses are means over the batch; the Trainer must scale them for accumulation

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            if module.weight is not None:
                init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, ViTNepaEmbeddings):
            init.trunc_normal_(module.cls_token, mean=0.0, std=std)
            if module.mask_token is not None:
                init.zeros_(module.mask_token)
            if module.position_embeddings is not None:
                init.trunc_normal_(module.position_embeddings, mean=0.0, std=std)
        elif isinstance(module, ViTNepaLayerScale):
            init.constant_(module.lambda1, self.config.layerscale_value)
        elif isinstance(module, nn.BatchNorm2d):
            super()._init_weights(module)  # weight 1, bias 0, running statistics reset


class ViTNepaModel(ViTNepaPreTrainedModel):
    def __init__(self, config: ViTNepaConfig):
        super().__init__(config)
        self.embeddings = ViTNepaEmbeddings(config)
        self.encoder = ViTNepaEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.BoolTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> ViTNepaModelOutput:
        r"""
        pixel_values: (batch, num_channels, height, width), height and width multiples of `patch_size`.
        bool_masked_pos: (batch, patches), `True` where a patch input is replaced by the mask token.
        """
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        patch_size = self.config.patch_size
        grid = (pixel_values.shape[-2] // patch_size, pixel_values.shape[-1] // patch_size)
        weight_dtype = self.embeddings.patch_embeddings.projection.weight.dtype
        hidden_states, input_embeddings = self.embeddings(pixel_values.to(weight_dtype), bool_masked_pos)
        hidden_states, all_hidden_states, all_attentions = self.encoder(
            hidden_states, grid, output_attentions, output_hidden_states
        )
        return ViTNepaModelOutput(
            last_hidden_state=self.layernorm(hidden_states),
            input_embeddings=input_embeddings,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
        )


def nepa_loss(predictions: torch.Tensor, targets: torch.Tensor, shift: bool = True) -> torch.Tensor:
    """Negative cosine between the prediction at t and the target at t+1 (or t without the shift),
    averaged over batch and positions, in float32."""
    if shift:
        predictions, targets = predictions[:, :-1], targets[:, 1:]
    predictions = F.normalize(predictions.float(), dim=-1)
    targets = F.normalize(targets.float(), dim=-1)
    return -(predictions * targets).sum(dim=-1).mean()


def random_patch_mask(batch: int, patches: int, ratio: float, device: torch.device) -> torch.BoolTensor:
    """Exactly round(ratio * patches) masked patches per image, chosen uniformly."""
    num_masked = round(ratio * patches)
    ranks = torch.rand(batch, patches, device=device).argsort(dim=1).argsort(dim=1)
    return ranks < num_masked


class ViTNepaForPreTraining(ViTNepaPreTrainedModel):
    """The encoder and the NEPA loss; there is no extra head: the last hidden state is the prediction."""

    def __init__(self, config: ViTNepaConfig):
        super().__init__(config)
        self.vit_nepa = ViTNepaModel(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.vit_nepa.get_input_embeddings()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.BoolTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> ViTNepaForPreTrainingOutput:
        r"""
        bool_masked_pos: patches to replace by the mask token; drawn at `nepa_mask_ratio` in training
            mode when not given.
        """
        if bool_masked_pos is None and self.training and self.config.nepa_mask_ratio > 0:
            patches = (pixel_values.shape[-2] // self.config.patch_size) * (pixel_values.shape[-1] // self.config.patch_size)
            bool_masked_pos = random_patch_mask(
                pixel_values.shape[0], patches, self.config.nepa_mask_ratio, pixel_values.device
            )
        outputs = self.vit_nepa(
            pixel_values,
            bool_masked_pos=bool_masked_pos,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        targets = outputs.input_embeddings
        if self.config.nepa_stop_grad:
            targets = targets.detach()
        loss = nepa_loss(outputs.last_hidden_state, targets, shift=self.config.nepa_shift)
        return ViTNepaForPreTrainingOutput(
            loss=loss,
            last_hidden_state=outputs.last_hidden_state,
            input_embeddings=outputs.input_embeddings,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


def mean_patch_tokens(last_hidden_state: torch.Tensor) -> torch.Tensor:
    """The mean of the patch tokens (every token after the cls token): an image's pooled feature."""
    return last_hidden_state[:, 1:].mean(dim=1)


class ViTNepaForImageClassification(ViTNepaPreTrainedModel):
    """Mean of the patch tokens -> fc_norm -> linear (with `add_pooling_layer`), else last token -> linear."""

    def __init__(self, config: ViTNepaConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vit_nepa = ViTNepaModel(config)
        self.fc_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.add_pooling_layer else None
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.vit_nepa.get_input_embeddings()

    def pool(self, last_hidden_state: torch.Tensor) -> torch.Tensor:
        if self.fc_norm is None:
            return last_hidden_state[:, -1]
        return self.fc_norm(mean_patch_tokens(last_hidden_state))

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> ViTNepaImageClassifierOutput:
        r"""
        labels: class indices of shape (batch,), or label distributions of shape (batch, num_labels)
            (mixup / cutmix / smoothing), for the cross-entropy loss.
        """
        outputs = self.vit_nepa(
            pixel_values, output_attentions=output_attentions, output_hidden_states=output_hidden_states
        )
        logits = self.classifier(self.pool(outputs.last_hidden_state))
        loss = classification_loss(logits, labels) if labels is not None else None
        return ViTNepaImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against class indices or against soft label distributions, in float32."""
    logits = logits.float()
    if labels.ndim == 1 and not labels.is_floating_point():
        return F.cross_entropy(logits, labels)
    if labels.shape == logits.shape and labels.is_floating_point():
        return torch.sum(-labels * F.log_softmax(logits, dim=-1), dim=-1).mean()
    raise ValueError(
        f"labels must be class indices of shape (batch,) or float distributions of shape {tuple(logits.shape)}, "
        f"got {labels.dtype} of shape {tuple(labels.shape)}."
    )


class ViTNepaNeck(nn.Module):
    """Four single-scale feature maps -> a pyramid at 4x, 2x, 1x and 1/2x the patch grid, the neck BEiT and
    MAE put under UperNet for a plain ViT: two stride-2 transposed convolutions (with BatchNorm and GELU
    between them), one, none, and a 2x2 max-pool."""

    def __init__(self, config: ViTNepaConfig):
        super().__init__()
        width = config.hidden_size
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(width, width, kernel_size=2, stride=2),
            nn.BatchNorm2d(width),
            nn.GELU(),
            nn.ConvTranspose2d(width, width, kernel_size=2, stride=2),
        )
        self.up2 = nn.ConvTranspose2d(width, width, kernel_size=2, stride=2)
        self.down2 = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, feature_maps: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return self.up4(feature_maps[0]), self.up2(feature_maps[1]), feature_maps[2], self.down2(feature_maps[3])


class ViTNepaBackbone(BackboneMixin, ViTNepaPreTrainedModel):
    """The encoder as a dense-prediction backbone (`AutoBackbone`, UperNet's `backbone_config`).

    The encoder sits under `vit_nepa.` as in the pretraining and classification models, so `from_pretrained`
    on either checkpoint loads every encoder tensor. The four stages named by `out_indices` (block N is stage N;
    stage 0 is the embeddings) give feature maps (batch, hidden, rows, cols): CLS dropped, each passed through the
    encoder's final LayerNorm (as DINOv2's backbone does: every depth comes out on one scale, and every
    pretrained tensor is used), then made a pyramid by `ViTNepaNeck`. Any image whose sides are multiples of
    `patch_size` runs; RoPE is computed for its grid. Attention follows `config.is_causal`: pass
    `is_causal=False` for bidirectional attention when loading a pretraining checkpoint, which is causal.
    """

    def __init__(self, config: ViTNepaConfig):
        super().__init__(config)
        if len(config.out_indices) != 4:
            raise ValueError(
                f"ViTNepaBackbone builds a 4-level pyramid from 4 blocks, but out_indices is {config.out_indices}: "
                f"pass 4 distinct stages between 0 (the embeddings) and num_hidden_layers={config.num_hidden_layers}."
            )
        self.num_features = [config.hidden_size] * (config.num_hidden_layers + 1)
        self.vit_nepa = ViTNepaModel(config)
        self.neck = ViTNepaNeck(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.vit_nepa.get_input_embeddings()

    def block_feature_maps(
        self, pixel_values: torch.Tensor, output_attentions: bool | None = None
    ) -> tuple[tuple[torch.Tensor, ...], ViTNepaModelOutput]:
        """The chosen blocks' normalised patch tokens as (batch, hidden, rows, cols), before the neck."""
        outputs = self.vit_nepa(pixel_values, output_attentions=output_attentions, output_hidden_states=True)
        rows, cols = (side // self.config.patch_size for side in pixel_values.shape[-2:])
        maps = []
        for index in self.out_indices:
            tokens = self.vit_nepa.layernorm(outputs.hidden_states[index][:, 1:])
            maps.append(tokens.transpose(1, 2).reshape(tokens.shape[0], -1, rows, cols))
        return tuple(maps), outputs

    @can_return_tuple
    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> BackboneOutput:
        r"""
        pixel_values: (batch, num_channels, height, width), height and width multiples of `patch_size`.
        Returns `feature_maps` at 4x, 2x, 1x and 1/2x the patch grid, each with `hidden_size` channels.
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        maps, outputs = self.block_feature_maps(pixel_values, output_attentions)
        return BackboneOutput(
            feature_maps=self.neck(maps),
            hidden_states=outputs.hidden_states if output_hidden_states else None,
            attentions=outputs.attentions,
        )


__all__ = [
    "ViTNepaBackbone",
    "ViTNepaModel",
    "ViTNepaForPreTraining",
    "ViTNepaForImageClassification",
    "ViTNepaPreTrainedModel",
    "nepa_loss",
]
