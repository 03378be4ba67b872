"""Sequence classification on top of Gemma 3: a linear score head read at the last
non-padding token, as transformers' Gemma3(Text)ForSequenceClassification does."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gemma3_lab.config import Gemma3Config
from gemma3_lab.explorer import Gemma3
from gemma3_lab.model.hook_point import HookPoint, name_hook_points


class Gemma3Classifier(Gemma3):
    def __init__(self, config: Gemma3Config, num_labels: int, tokenizer=None) -> None:
        super().__init__(config, tokenizer)
        self.num_labels = num_labels
        self.score = nn.Linear(config.text.hidden_size, num_labels, bias=False)
        self.hook_scores = HookPoint()  # (B, num_labels) pooled scores
        self.hook_points = name_hook_points(self)

    def classify(self, inputs, **kwargs) -> Tensor:
        """(B, num_labels) scores at each row's last non-pad token."""
        x = self.to_inputs(inputs).to(self.device)
        out = super().forward(x, **{**kwargs, "return_hidden": True, "logits_to_keep": 1})
        per_token = self.score(out.hidden)  # (B, S, num_labels)
        # transformers picks the last position whose id is not <pad> (right or left padding)
        ids = x.input_ids
        not_pad = (ids != self.config.text.pad_token_id).long()
        last = (torch.arange(ids.shape[1], device=ids.device) * not_pad).argmax(-1)
        return self.hook_scores(per_token[torch.arange(ids.shape[0], device=ids.device), last])
