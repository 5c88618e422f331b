"""A locked (LiT) Hugging Face text tower that remembers the features of captions it has seen.

With the transformer frozen, a caption's pooled feature never changes, so a corpus whose captions
repeat (the lab's class-name templates) pays for the 22M-parameter encoder once per caption.
Only the projection trains. The state dict is the same as open_clip's `HFTextEncoder`.
"""

from __future__ import annotations

import torch
from open_clip.hf_model import HFTextEncoder


class LockedHFTextEncoder(HFTextEncoder):
    """`HFTextEncoder` with a frozen transformer kept in eval mode and a bounded feature memo."""

    max_memo = 200_000

    def lock_and_memoize(self) -> None:
        for p in self.transformer.parameters():
            p.requires_grad = False
        self.memo: dict[bytes, torch.Tensor] = {}
        self.train(self.training)

    def train(self, mode: bool = True) -> LockedHFTextEncoder:
        super().train(mode)
        self.transformer.eval()  # no dropout in a locked tower
        return self

    @torch.no_grad()
    def _pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = (tokens != self.config.pad_token_id).long()
        return self.pooler(self.transformer(input_ids=tokens, attention_mask=mask), mask)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        keys = [row.tobytes() for row in tokens.cpu().numpy()]
        new = {k: i for i, k in enumerate(keys) if k not in self.memo}
        if new:
            pooled = self._pooled(tokens[list(new.values())])
            if len(self.memo) + len(new) > self.max_memo:  # a corpus of unique captions: no memo
                fresh = dict(zip(new, pooled, strict=True))
                stacked = torch.stack([self.memo.get(k, fresh.get(k)) for k in keys])
                return self.proj(stacked.to(tokens.device))
            self.memo.update(zip(new, pooled.detach(), strict=True))
        return self.proj(torch.stack([self.memo[k] for k in keys]).to(tokens.device))
