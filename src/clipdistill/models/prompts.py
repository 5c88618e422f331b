"""Prompts for a frozen open_clip teacher: CoOp text context and VPT-deep visual prompts.

Text: `[CLS] ctx_1 .. ctx_n <class name> [SEP]`.
The n context vectors are the only trainable weights; they replace the word embeddings of n
placeholder tokens, so the frozen text tower runs unchanged. Two towers are supported:
open_clip's own text transformer (`CLIP`, through its token embedding) and a Hugging Face tower
(`CustomTextCLIP`, such as the lab's MiniLM, through `inputs_embeds`).

Visual (VPT-deep, Jia et al. 2022): fresh learnable tokens after the class token at each of the
first `depth` blocks of an open_clip ViT; they are dropped before pooling.
"""

from __future__ import annotations

from pathlib import Path

import torch
from open_clip.hf_model import HFTextEncoder
from open_clip.transformer import VisionTransformer, text_global_pool
from torch import nn

from clipdistill.checkpoint import load_state_dict

CTX_INIT = "a photo of a"  # CoOp's initialisation: the context starts as a hand-written prompt
PLACEHOLDER = "x"  # one word-piece in the lab's BERT vocabulary (and in CLIP's BPE)


class TextPromptLearner(nn.Module):
    """Learnable context tokens shared by all classes (CoOp's unified context, class token at the end)."""

    def __init__(self, model: nn.Module, tokenizer, classnames: list[str], n_ctx: int) -> None:
        super().__init__()
        if n_ctx < 1:
            raise ValueError(f"comkd.n_ctx must be at least 1, not {n_ctx}")
        self.hf = isinstance(getattr(model, "text", None), HFTextEncoder)
        embedding = self._word_embedding(model)
        prompts = [" ".join([PLACEHOLDER] * n_ctx) + f" {name}." for name in classnames]
        tokens = tokenizer(prompts)
        with torch.no_grad():
            init = embedding(tokenizer([CTX_INIT])[0, 1 : 1 + n_ctx])  # skip [CLS] / start token
            ctx = torch.randn(n_ctx, embedding.embedding_dim) * 0.02
            ctx[: len(init)] = init[:n_ctx]
        self.ctx = nn.Parameter(ctx)
        self.n_ctx = n_ctx
        self.register_buffer("tokens", tokens, persistent=False)

    @staticmethod
    def _word_embedding(model: nn.Module) -> nn.Embedding:
        text = getattr(model, "text", None)
        if isinstance(text, HFTextEncoder):
            return text.transformer.get_input_embeddings()
        if hasattr(model, "token_embedding"):
            return model.token_embedding
        raise TypeError("text prompts need an open_clip CLIP or a Hugging Face text tower (CustomTextCLIP)")

    def _embedded(self, model: nn.Module) -> torch.Tensor:
        """Word embeddings of the class prompts with the placeholders replaced by the context."""
        words = self._word_embedding(model)(self.tokens)
        ctx = self.ctx.to(words.dtype).expand(len(words), -1, -1)
        return torch.cat([words[:, :1], ctx, words[:, 1 + self.n_ctx :]], dim=1)

    def forward(self, model: nn.Module) -> torch.Tensor:
        """Unnormalised class text features [K, D] of the (frozen) `model` with the learned context."""
        x = self._embedded(model)
        if self.hf:
            text = model.text
            mask = (self.tokens != text.config.pad_token_id).long()
            out = text.transformer(inputs_embeds=x, attention_mask=mask)
            return text.proj(text.pooler(out, mask))
        x = x + model.positional_embedding.to(x.dtype)
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
        x = text_global_pool(
            x, self.tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None)
        )
        proj = model.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj


class VisualPromptLearner(nn.Module):
    """VPT-deep: `n_tokens` prompts per block for the first `depth` blocks; the ViT stays frozen."""

    def __init__(self, visual: nn.Module, depth: int, n_tokens: int) -> None:
        super().__init__()
        if not isinstance(visual, VisionTransformer):
            raise TypeError("deep visual prompts need an open_clip VisionTransformer image tower")
        layers = len(visual.transformer.resblocks)
        if not 1 <= depth <= layers or n_tokens < 0:
            raise ValueError(
                f"comkd.vpt_depth (student_vpt_depth for the student) must be in 1..{layers} and the "
                f"tokens >= 0, not {depth} and {n_tokens}"
            )
        self.prompts = nn.Parameter(torch.randn(depth, n_tokens, visual.conv1.out_channels) * 0.02)

    def forward(self, visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised image features of the prompted `visual` (what `encode_image` returns)."""
        x = visual._embeds(images)  # [B, 1 + patches, width]
        depth, n = self.prompts.shape[:2]
        for i, block in enumerate(visual.transformer.resblocks):
            if i < depth:  # replace the previous block's prompts (none before block 0) with fresh ones
                prompts = self.prompts[i].to(x.dtype).expand(len(x), -1, -1)
                x = torch.cat([x[:, :1], prompts, x[:, 1 + (n if i else 0) :]], dim=1)
            x = block(x) if visual.transformer.batch_first else block(x.transpose(0, 1)).transpose(0, 1)
        x = torch.cat([x[:, :1], x[:, 1 + n :]], dim=1)  # pool over the class token and patches only
        pooled, _ = visual._pool(x)
        return pooled @ visual.proj if visual.proj is not None else pooled


def attach_visual_prompts(model: nn.Module, folder: Path) -> bool:
    """Route `model.encode_image` through the visual prompts stage 1 saved in `folder`, if any (eval);
    returns whether there were any."""
    heads = Path(folder) / "heads.safetensors"
    state = load_state_dict(heads) if heads.is_file() else {}
    if "visual_prompts.prompts" not in state:
        return False
    prompts = state["visual_prompts.prompts"]
    vpt = VisualPromptLearner(model.visual, prompts.shape[0], prompts.shape[1])
    vpt.load_state_dict({"prompts": prompts})
    vpt.requires_grad_(False).to(next(model.parameters()).device)
    model.encode_image = lambda images, normalize=False: vpt(model.visual, images)
    return True
