"""The settings of the models the engine runs, as pydantic models: the engine config's `ground.detector` and
`clean.embedder` sections are these models themselves. Their own module, free of torch, so that loading a config
(the CLI, `check`, a Prefect deployment) never imports torch (~2 s, ~300 MB)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class DetectorConfig(BaseModel):
    """How to load and run the detector; the engine config's `ground.detector` section itself."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str | None = None                # local folder or hub id (hub ids need local_files_only: false)
    backend: Literal["transformers", "groundingdino"] = "transformers"
    box_threshold: float = Field(0.35, ge=0, lt=1)    # a query is kept if its best token score exceeds this
    text_threshold: float = Field(0.25, ge=0, lt=1)   # ... and it is assigned every tag whose score exceeds this
    max_text_tokens: int | None = Field(None, ge=4)   # prompt chunk budget (CLS, a token, '.', SEP at least);
                                                      # None: the model's max_text_len
    shortest_edge: int = Field(800, ge=32)  # image resize (the processor's defaults for the real model)
    longest_edge: int = Field(1333, ge=32)
    batch_size: int = Field(4, ge=1)        # (image, chunk) pairs per forward pass
    device: str = "auto"                    # auto: CUDA when there is one
    local_files_only: bool = True           # never reach the network unless the config says so
    gd_config_file: str | None = None       # groundingdino-py backend only: its python config file
    gd_text_encoder: str | None = None      # ... and BERT folder

    @model_validator(mode="after")
    def _relations(self):
        if self.shortest_edge > self.longest_edge:
            raise ValueError(f"shortest_edge ({self.shortest_edge}) is over ground.detector.longest_edge "
                             f"({self.longest_edge})")
        return self

    def require_model(self) -> str:
        if not self.model:
            raise ValueError("ground.detector.model is not set: give a Grounding DINO folder (or hub id while online)")
        return self.model


class EmbedderConfig(BaseModel):
    """How crops are embedded; the engine config's `clean.embedder` section itself."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    kind: Literal["baseline", "clip", "conv"] = "baseline"   # the tagger's image encoder, CLIP's image tower,
                                            # or a shipped ConvCropEncoder (the demo's stand-in for CLIP)
    model: str | None = None                # clip: local folder or hub id; conv: its folder
    image_size: int | None = Field(None, ge=8)   # baseline: the encoder's input size; None: given by the caller
    pool: Literal["first", "mean"] = "first"     # baseline: "first" token (RAM's pooled token) | "mean"
    batch_size: int = Field(64, ge=1)
    device: str = "auto"                    # auto: CUDA when there is one
    local_files_only: bool = True
